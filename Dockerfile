# eplbd container image.
#
#   podman build -t eplbd .                          (or docker build)
#   podman run -p 127.0.0.1:50051:50051 -v eplbd-data:/var/lib/eplbd eplbd
#
# The builder uses the project's own scripts/setup.sh and CMake, exactly as a
# developer machine does; the runtime stage gets only the shared libraries the
# binaries link against (derived from ldd in the builder, see below).
#
# Build args:
#   BASE_IMAGE  Debian 12 base of both stages (default debian:bookworm).
#   EPLB_HIP    OFF (default) or ON: hook for the HIP GPU backend. ON installs
#               Debian's hipcc/libamdhip64-dev in the builder (HIP_PACKAGES),
#               passes -DEPLB_HIP=ON to CMake and libamdhip64-5 into the runtime
#               (HIP_RUNTIME_PACKAGES). See docs/deploy.md for gfx942 / ROCm 6.
#   EPLB_CUDA   OFF (default) or ON: also build libeplb_backend_cuda.so
#               (-DEPLB_CUDA=ON) and put it next to eplbd. Needs nvcc in the
#               builder, which Debian does not package: a BASE_IMAGE with the
#               CUDA toolkit (e.g. NVIDIA's Debian 12 repository), or
#               CMAKE_ARGS=-DEPLB_NVCC=/path/to/nvcc. The runtime needs nothing
#               more (static cudart); the container gets the driver from the
#               NVIDIA Container Toolkit.
#   CMAKE_ARGS  extra CMake arguments (e.g. the GPU architecture list).

ARG BASE_IMAGE=debian:bookworm

FROM ${BASE_IMAGE} AS builder
WORKDIR /src

# Toolchain, libraries and the upb tree (.deps/upb): cached until scripts/
# change, and shared by all values of the build args declared below it.
COPY scripts/ scripts/
RUN bash scripts/setup.sh

ARG EPLB_HIP=OFF
ARG EPLB_CUDA=OFF
ARG HIP_PACKAGES="hipcc libamdhip64-dev"
ARG CMAKE_ARGS=""
RUN if [ "$EPLB_HIP" = ON ]; then \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $HIP_PACKAGES; \
    fi

COPY . .
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEPLB_BUILD_TESTS=OFF \
          -DEPLB_HIP="$EPLB_HIP" -DEPLB_CUDA="$EPLB_CUDA" $CMAKE_ARGS \
 && cmake --build /build --parallel "$(nproc)" --target eplbd eplbctl \
 && if [ "$EPLB_HIP" = ON ]; then cmake --build /build --target eplb_backend_hip; fi \
 && if [ "$EPLB_CUDA" = ON ]; then cmake --build /build --target eplb_backend_cuda; fi \
 && mkdir -p /build/backends \
 && { [ ! -f /build/libeplb_backend_hip.so ] || cp /build/libeplb_backend_hip.so /build/backends/; } \
 && { [ ! -f /build/libeplb_backend_cuda.so ] || cp /build/libeplb_backend_cuda.so /build/backends/; } \
 && /build/eplbd --version

# The Debian packages that own the shared libraries eplbd and eplbctl load.
# (dpkg knows bookworm's libraries under /lib or /usr/lib: try both.)
RUN for lib in $(ldd /build/eplbd /build/eplbctl | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u); do \
        real=$(readlink -f "$lib"); \
        dpkg -S "$lib" 2>/dev/null || dpkg -S "$real" 2>/dev/null || dpkg -S "/usr$real" 2>/dev/null \
            || { echo "no package owns $lib" >&2; exit 1; }; \
    done >/build/library-owners \
 && cut -d: -f1 /build/library-owners | sort -u >/build/runtime-packages \
 && cat /build/runtime-packages

FROM ${BASE_IMAGE} AS runtime
ARG EPLB_HIP=OFF
ARG HIP_RUNTIME_PACKAGES="libamdhip64-5"
COPY --from=builder /build/runtime-packages /usr/share/eplbd/runtime-packages
RUN extra=""; if [ "$EPLB_HIP" = ON ]; then extra="$HIP_RUNTIME_PACKAGES"; fi; \
    apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(cat /usr/share/eplbd/runtime-packages) $extra \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log \
 && useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /var/lib/eplbd --shell /usr/sbin/nologin eplbd \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/eplbd

COPY --from=builder /build/eplbd /build/eplbctl /usr/local/bin/
# The GPU backends (EPLB_HIP=ON, EPLB_CUDA=ON): next to eplbd, where
# --backend auto finds them.
COPY --from=builder /build/backends/ /usr/local/bin/

LABEL org.opencontainers.image.title="eplbd" \
      org.opencontainers.image.description="Expert-parallel load balancing service for MoE inference (gRPC)"

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /var/lib/eplbd
VOLUME ["/var/lib/eplbd"]
EXPOSE 50051
# eplbd drains in-flight calls on SIGTERM for up to --drain-ms (default 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["eplbd"]
# 0.0.0.0, not 127.0.0.1: a container's loopback is private to its network
# namespace, and -p, a Service or a kubelet probe connect to its interface
# address. Same-pod clients should pass --listen 127.0.0.1:50051 or a unix
# socket instead (deploy/README.md, "Where eplbd should listen").
CMD ["--listen", "0.0.0.0:50051", "--data-dir", "/var/lib/eplbd"]
