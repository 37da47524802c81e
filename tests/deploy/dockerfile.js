#!/usr/bin/env node
// dockerfile.js MODE DOCKERFILE -- offline checks of eplbd's Dockerfile.
//
//   lint    dockerfile-utils' validator (the one behind the VS Code Docker
//           extension): unknown instructions, bad arguments, bad ports, ...
//           Any error or warning is a problem.
//   policy  what the image promises (docs/deploy.md): a builder that runs the
//           project's own scripts/setup.sh and CMake without tests; a runtime
//           stage on the same Debian base, numeric non-root USER, VOLUME
//           /var/lib/eplbd, EXPOSE 50051, exec-form ENTRYPOINT ["eplbd"] with
//           overridable CMD flags; the EPLB_HIP build arg.
'use strict';
const fs = require('fs');
const { validate } = require('dockerfile-utils');
const { DockerfileParser } = require('dockerfile-ast');

const [mode, file] = process.argv.slice(2);
if (!['lint', 'policy'].includes(mode) || !file) {
  console.error('usage: dockerfile.js lint|policy DOCKERFILE');
  process.exit(2);
}
const text = fs.readFileSync(file, 'utf8');
const problems = [];

if (mode === 'lint') {
  for (const d of validate(text)) {
    const sev = { 1: 'error', 2: 'warning', 3: 'info', 4: 'hint' }[d.severity] || d.severity;
    if (d.severity <= 2) problems.push(`${file}:${d.range.start.line + 1}: ${sev}: ${d.message}`);
  }
} else {
  const df = DockerfileParser.parse(text);
  const ins = df.getInstructions();
  // Global ARG defaults (before the first FROM) resolve the FROM lines.
  const args = {};
  for (const i of ins) {
    if (i.getKeyword() === 'FROM') break;
    if (i.getKeyword() === 'ARG') {
      const m = /^([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(i.getArgumentsContent().trim());
      if (m) args[m[1]] = m[2].replace(/^"(.*)"$/, '$1');
    }
  }
  const resolve = (s) => s.replace(/\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?/g, (m, n) => (n in args ? args[n] : m));
  const stages = [];
  for (const i of ins) {
    if (i.getKeyword() === 'FROM') stages.push({ from: resolve(i.getArgumentsContent().split(/\s+/)[0]), ins: [] });
    else if (stages.length) stages[stages.length - 1].ins.push(i);
  }
  const kw = (stage, k) => stage.ins.filter((i) => i.getKeyword() === k);
  const content = (i) => i.getArgumentsContent() || '';
  const json = (i) => { try { return JSON.parse(content(i)); } catch (e) { return null; } };

  if (stages.length < 2) problems.push('not a multi-stage build (builder + runtime)');
  for (const s of stages)
    if (s.from !== 'debian:bookworm') problems.push(`stage FROM ${s.from}: expected debian:bookworm by default`);
  const builder = stages[0] || { ins: [] };
  const runtime = stages[stages.length - 1] || { ins: [] };
  const builderRuns = kw(builder, 'RUN').map(content).join('\n');
  if (!/scripts\/setup\.sh/.test(builderRuns)) problems.push("builder does not run the project's scripts/setup.sh");
  if (!/cmake\s+-S/.test(builderRuns) || !/-DEPLB_BUILD_TESTS=OFF/.test(builderRuns))
    problems.push('builder does not configure with CMake and -DEPLB_BUILD_TESTS=OFF');
  if (!/-DEPLB_HIP=/.test(builderRuns)) problems.push('builder does not pass EPLB_HIP to CMake');
  if (!ins.some((i) => i.getKeyword() === 'ARG' && /^EPLB_HIP(=|$)/.test(content(i).trim())))
    problems.push('no EPLB_HIP build arg');

  const user = kw(runtime, 'USER').map(content).pop();
  if (!user) problems.push('runtime stage has no USER (runs as root)');
  else if (!/^[0-9]+(:[0-9]+)?$/.test(user.trim()) || /^0(:|$)/.test(user.trim()))
    problems.push(`runtime USER ${user}: use a numeric non-root uid (runAsNonRoot can verify it)`);
  const volumes = kw(runtime, 'VOLUME').map((i) => JSON.stringify(json(i) || content(i))).join(' ');
  if (!volumes.includes('/var/lib/eplbd')) problems.push('runtime has no VOLUME /var/lib/eplbd');
  if (!kw(runtime, 'EXPOSE').some((i) => /(^|\s)50051(\/tcp)?(\s|$)/.test(content(i)))) problems.push('runtime does not EXPOSE 50051');
  const entry = kw(runtime, 'ENTRYPOINT').pop();
  const ep = entry && json(entry);
  if (!Array.isArray(ep) || ep.length !== 1 || ep[0] !== 'eplbd')
    problems.push('ENTRYPOINT is not the exec form ["eplbd"] (signals must reach eplbd, CMD must stay flags)');
  const cmd = kw(runtime, 'CMD').pop();
  const cm = cmd && json(cmd);
  if (!Array.isArray(cm) || cm.join(' ') !== '--listen 0.0.0.0:50051 --data-dir /var/lib/eplbd')
    problems.push('CMD is not ["--listen", "0.0.0.0:50051", "--data-dir", "/var/lib/eplbd"]');
  for (const i of kw(runtime, 'COPY').concat(kw(runtime, 'ADD')))
    if (!i.getFlags().some((f) => f.getName() === 'from'))
      problems.push(`runtime stage copies from the build context: ${content(i)}`);
  for (const r of kw(runtime, 'RUN').map(content))
    if (/apt-get install/.test(r) && !/--no-install-recommends/.test(r))
      problems.push('runtime apt-get install without --no-install-recommends');
}

for (const p of problems) console.log(p);
console.log(`dockerfile ${mode}: ${problems.length} problem(s)`);
process.exit(problems.length ? 1 : 0);
