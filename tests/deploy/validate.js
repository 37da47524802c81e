#!/usr/bin/env node
// validate.js MODE FILE... -- offline checks of rendered Kubernetes manifests.
//
//   schema  every object against the Kubernetes OpenAPI schemas of the
//           kubernetes-models package (v4, about Kubernetes 1.30): types,
//           required fields, enums. (It does not flag unknown field names:
//           fields.py does.)
//   policy  what eplbd's deployment promises: restrictive securityContext,
//           requests and limits, probes that can reach the listen address,
//           a grace period longer than the drain, $(VAR)s that resolve, a
//           writable data dir under a read-only root, shared /dev/shm next to
//           GPUs, one SQLite writer, a NetworkPolicy in front of a Service.
//
// Prints one line per problem and exits 1 if there is any.
'use strict';
const fs = require('fs');
const YAML = require('yaml');

const [mode, ...files] = process.argv.slice(2);
if (!['schema', 'policy'].includes(mode) || files.length === 0) {
  console.error('usage: validate.js schema|policy FILE...');
  process.exit(2);
}

const problems = [];
const objects = [];
for (const file of files) {
  const docs = YAML.parseAllDocuments(fs.readFileSync(file, 'utf8'));
  for (const doc of docs) {
    if (doc.errors.length) {
      problems.push(`${file}: YAML: ${doc.errors[0].message}`);
      continue;
    }
    const obj = doc.toJS();
    if (obj !== null && obj !== undefined) objects.push({ file, obj });
  }
}
const id = ({ file, obj }) => `${file}: ${obj.kind}/${(obj.metadata || {}).name}`;

// ---- schema ---------------------------------------------------------------
function checkSchema({ file, obj }) {
  if (typeof obj !== 'object' || !obj.apiVersion || !obj.kind) {
    problems.push(`${file}: object without apiVersion/kind`);
    return;
  }
  let mod;
  try {
    mod = require(`kubernetes-models/${obj.apiVersion}`);
  } catch (e) {
    problems.push(`${id({ file, obj })}: unknown apiVersion ${obj.apiVersion}`);
    return;
  }
  const Model = mod[obj.kind];
  if (typeof Model !== 'function') {
    problems.push(`${id({ file, obj })}: unknown kind ${obj.kind} in ${obj.apiVersion}`);
    return;
  }
  try {
    new Model(obj).validate();
  } catch (e) {
    const errs = e.errors || [{ instancePath: '', message: e.message }];
    for (const err of errs) {
      const extra = err.params && err.params.allowedValues ? ` (${err.params.allowedValues.join(', ')})` : '';
      problems.push(`${id({ file, obj })}: ${err.instancePath || '/'} ${err.message}${extra}`);
    }
  }
}

// ---- policy ---------------------------------------------------------------
const cpuMem = ['cpu', 'memory'];

function podSpecOf(obj) {
  switch (obj.kind) {
    case 'Pod': return obj.spec;
    case 'Deployment': case 'StatefulSet': case 'DaemonSet': case 'ReplicaSet': case 'Job':
      return obj.spec && obj.spec.template && obj.spec.template.spec;
    case 'CronJob':
      return obj.spec && obj.spec.jobTemplate && obj.spec.jobTemplate.spec.template.spec;
    default: return null;
  }
}
function podLabelsOf(obj) {
  if (obj.kind === 'Pod') return (obj.metadata || {}).labels || {};
  return ((obj.spec.template || {}).metadata || {}).labels || {};
}
const matches = (selector, labels) =>
  Object.entries(selector || {}).every(([k, v]) => labels[k] === v);

function configMaps() {
  const maps = {};
  for (const { obj } of objects) if (obj.kind === 'ConfigMap') maps[obj.metadata.name] = obj.data || {};
  return maps;
}

// The container's environment as the kubelet builds it (envFrom, then env).
function envOf(c, maps, where) {
  const env = {};
  for (const src of c.envFrom || []) {
    if (src.configMapRef) {
      const data = maps[src.configMapRef.name];
      if (!data) problems.push(`${where}: envFrom ConfigMap ${src.configMapRef.name} is not in the manifests`);
      Object.assign(env, data || {});
    }
  }
  for (const e of c.env || []) {
    if (e.value !== undefined) env[e.name] = expand(e.value, env);
    else if (e.valueFrom && e.valueFrom.configMapKeyRef) {
      const ref = e.valueFrom.configMapKeyRef;
      const data = maps[ref.name];
      if (!data || !(ref.key in data)) problems.push(`${where}: env ${e.name}: ConfigMap key ${ref.name}/${ref.key} not found`);
      else env[e.name] = data[ref.key];
    } else env[e.name] = '<runtime>';
  }
  return env;
}
function expand(s, env, where) {
  return String(s).replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (m, name) => {
    if (name in env) return env[name];
    if (where) problems.push(`${where}: $(${name}) is not defined in the container's environment`);
    return m;
  });
}
// --flag=value or --flag value from the expanded args.
function flag(args, name) {
  for (let i = 0; i < args.length; i++) {
    if (args[i] === `--${name}`) return args[i + 1];
    if (args[i].startsWith(`--${name}=`)) return args[i].slice(name.length + 3);
  }
  return undefined;
}

function checkContainer(c, pod, where, init) {
  const sc = c.securityContext || {};
  const psc = pod.securityContext || {};
  if (!(sc.runAsNonRoot === true || (psc.runAsNonRoot === true && sc.runAsNonRoot !== false)))
    problems.push(`${where}: runAsNonRoot is not true`);
  if (sc.allowPrivilegeEscalation !== false) problems.push(`${where}: allowPrivilegeEscalation is not false`);
  if (sc.readOnlyRootFilesystem !== true) problems.push(`${where}: readOnlyRootFilesystem is not true`);
  if (sc.privileged === true) problems.push(`${where}: privileged`);
  if (!((sc.capabilities || {}).drop || []).includes('ALL')) problems.push(`${where}: capabilities do not drop ALL`);
  if ((sc.capabilities || {}).add) problems.push(`${where}: adds capabilities`);
  const seccomp = (sc.seccompProfile || psc.seccompProfile || {}).type;
  if (seccomp !== 'RuntimeDefault' && seccomp !== 'Localhost')
    problems.push(`${where}: seccompProfile is not RuntimeDefault`);
  const res = c.resources || {};
  for (const kind of ['requests', 'limits'])
    for (const r of cpuMem)
      if (!(res[kind] && res[kind][r] !== undefined)) problems.push(`${where}: no ${kind}.${r}`);
  if (init && c.restartPolicy !== 'Always' && /eplbd/.test(c.image || ''))
    problems.push(`${where}: eplbd as a plain init container would block the pod (use restartPolicy: Always)`);
}

function checkEplbd(c, pod, where, maps, podMeta) {
  const env = envOf(c, maps, where);
  const args = [...(c.command || []), ...(c.args || [])].map((a) => expand(a, env, where));
  const listen = flag(args, 'listen') || '127.0.0.1:50051';
  const drainArg = flag(args, 'drain-ms');
  const drainMs = drainArg === undefined ? 10000 : Number(drainArg);
  if (!Number.isInteger(drainMs)) problems.push(`${where}: --drain-ms ${drainArg} is not a number`);
  const dataDir = flag(args, 'data-dir');
  const grace = pod.terminationGracePeriodSeconds === undefined ? 30 : pod.terminationGracePeriodSeconds;
  if (Number.isInteger(drainMs) && !(grace * 1000 > drainMs))
    problems.push(`${where}: terminationGracePeriodSeconds ${grace} s is not longer than --drain-ms ${drainMs}`);

  const m = /^(?:\[(.*)\]|(.*)):(\d+)$/.exec(listen);
  const unix = listen.startsWith('unix:');
  const host = m ? (m[1] || m[2]) : '';
  const port = m ? Number(m[3]) : 0;
  const loopback = unix || /^(127\.|localhost$|::1$)/.test(host);
  const tls = flag(args, 'tls-cert') !== undefined;
  for (const kind of ['readinessProbe', 'livenessProbe']) {
    const p = c[kind];
    if (!p) { problems.push(`${where}: no ${kind}`); continue; }
    if (tls) {
      // The kubelet's gRPC probe has no TLS settings: it cannot pass a TLS handshake.
      const cmd = ((p.exec || {}).command || []).join(' ');
      if (!p.exec || !/eplbctl/.test(cmd) || !/--tls-ca/.test(cmd))
        problems.push(`${where}: ${kind}: eplbd serves TLS, so probe with an exec of eplbctl --tls-ca ... health`);
    } else if (loopback) {
      if (!p.exec) problems.push(`${where}: ${kind}: eplbd listens on ${listen}, which only an exec probe can reach`);
    } else if (!p.grpc) {
      problems.push(`${where}: ${kind}: use a native gRPC probe (grpc.health.v1) on port ${port}`);
    } else if (p.grpc.port !== port) {
      problems.push(`${where}: ${kind}: gRPC probe on port ${p.grpc.port}, eplbd listens on ${listen}`);
    }
  }
  if (!loopback && !(c.ports || []).some((p) => p.containerPort === port))
    problems.push(`${where}: listen port ${port} is not a containerPort`);

  const mounts = c.volumeMounts || [];
  const mounted = (path) => mounts.find((v) => v.mountPath === path && !v.readOnly);

  // TLS files come from a Secret, mounted read-only.
  for (const f of ['tls-cert', 'tls-key', 'tls-client-ca']) {
    const path = flag(args, f);
    if (path === undefined) continue;
    const mnt = mounts.find((v) => path.startsWith(`${v.mountPath.replace(/\/$/, '')}/`));
    const vol = mnt && (pod.volumes || []).find((v) => v.name === mnt.name);
    if (!mnt || !vol || !vol.secret) problems.push(`${where}: --${f} ${path} is not in a mounted Secret`);
    else if (!mnt.readOnly) problems.push(`${where}: --${f} ${path}: the Secret volume ${mnt.name} is not mounted readOnly`);
  }

  // Metrics: a port Prometheus can reach, and scrape annotations that match it.
  const ann = (podMeta || {}).annotations || {};
  const metricsListen = flag(args, 'metrics-listen');
  if (metricsListen !== undefined) {
    const mm = /^(?:\[(.*)\]|(.*)):(\d+)$/.exec(metricsListen);
    if (!mm) problems.push(`${where}: --metrics-listen ${metricsListen} is not host:port`);
    else {
      const mport = Number(mm[3]);
      const mloop = /^(127\.|localhost$|::1$)/.test(mm[1] || mm[2]);
      if (!mloop && !(c.ports || []).some((p) => p.containerPort === mport))
        problems.push(`${where}: metrics port ${mport} is not a containerPort`);
      if (ann['prometheus.io/scrape'] === 'true' && mloop)
        problems.push(`${where}: prometheus.io/scrape is set but --metrics-listen ${metricsListen} is loopback-only`);
      if (ann['prometheus.io/port'] !== undefined && Number(ann['prometheus.io/port']) !== mport)
        problems.push(`${where}: prometheus.io/port ${ann['prometheus.io/port']} but --metrics-listen port ${mport}`);
      if (ann['prometheus.io/path'] !== undefined && ann['prometheus.io/path'] !== '/metrics')
        problems.push(`${where}: prometheus.io/path ${ann['prometheus.io/path']}: eplbd serves /metrics`);
    }
  } else if (ann['prometheus.io/scrape'] === 'true') {
    problems.push(`${where}: prometheus.io/scrape is set but eplbd has no --metrics-listen`);
  }
  if (!dataDir) problems.push(`${where}: no --data-dir`);
  else if (!mounted(dataDir)) problems.push(`${where}: data dir ${dataDir} is not a writable volume (read-only root)`);
  if (!mounted('/tmp')) problems.push(`${where}: /tmp is not a writable volume (SQLite temp files, read-only root)`);
  return mounts;
}

function checkPolicy() {
  const maps = configMaps();
  const eplbdPods = [];
  for (const entry of objects) {
    const { obj } = entry;
    const pod = podSpecOf(obj);
    if (!pod) continue;
    const base = id(entry);
    for (const k of ['hostIPC', 'hostPID', 'hostNetwork'])
      if (pod[k]) problems.push(`${base}: ${k} is set`);
    if (pod.automountServiceAccountToken !== false)
      problems.push(`${base}: automountServiceAccountToken is not false`);
    const all = [...(pod.initContainers || []).map((c) => [c, true]), ...(pod.containers || []).map((c) => [c, false])];
    let gpus = false;
    for (const [c, init] of all) {
      const where = `${base}: container ${c.name || '(no name)'}`;
      checkContainer(c, pod, where, init);
      const limits = (c.resources || {}).limits || {};
      if (Object.keys(limits).some((r) => /(^|\/)gpu$/.test(r))) gpus = true;
      if (c.name === 'eplbd' || /(^|\/)eplbd(:|@|$)/.test(c.image || '')) {
        const podMeta = obj.kind === 'Pod' ? obj.metadata : ((obj.spec || {}).template || {}).metadata;
        checkEplbd(c, pod, where, maps, podMeta);
        eplbdPods.push(obj);
        if (obj.kind === 'StatefulSet' || obj.kind === 'Deployment') {
          if ((obj.spec.replicas === undefined ? 1 : obj.spec.replicas) > 1 && obj.kind === 'StatefulSet')
            problems.push(`${base}: more than one replica writing one SQLite database`);
        }
      }
    }
    if (gpus) {
      const shm = (pod.volumes || []).find((v) => v.emptyDir && v.emptyDir.medium === 'Memory'
        && all.every(([c]) => (c.volumeMounts || []).some((m) => m.name === v.name && m.mountPath === '/dev/shm')));
      if (!shm) problems.push(`${base}: GPU pod without a memory-backed /dev/shm shared by all its containers`);
    }
  }
  for (const { obj, file } of objects) {
    if (obj.kind !== 'Service' || !obj.spec || !obj.spec.selector) continue;
    const targets = eplbdPods.filter((w) => matches(obj.spec.selector, podLabelsOf(w)));
    for (const w of targets) {
      const covered = objects.some(({ obj: np }) => np.kind === 'NetworkPolicy'
        && matches((np.spec.podSelector || {}).matchLabels, podLabelsOf(w))
        && (np.spec.policyTypes || []).includes('Ingress')
        && (np.spec.ingress || []).every((r) => (r.from || []).length > 0 && (r.ports || []).length > 0));
      if (!covered)
        problems.push(`${file}: Service/${obj.metadata.name} exposes ${w.kind}/${w.metadata.name} with no NetworkPolicy limiting who and which port`);
    }
  }
}

if (mode === 'schema') objects.forEach(checkSchema);
else checkPolicy();
if (objects.length === 0) problems.push(`${files.join(' ')}: no objects`);
for (const p of problems) console.log(p);
console.log(`${mode}: ${objects.length} object(s), ${problems.length} problem(s)`);
process.exit(problems.length ? 1 : 0);
