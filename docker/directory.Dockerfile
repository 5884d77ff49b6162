# baker/directory: the rendezvous of live instances and canary routes, FROM scratch.
# Built by docker/build.sh, which stages rootfs/ (binaries, the libraries ldd names, /etc, /tmp).
#
# Runs as the `baker` user (65532). To discover labelled containers it needs the Docker socket,
# which only root and the socket's group may use: add `--group-add $(stat -c %g
# /var/run/docker.sock)` or run with `--user root` (see docs/docker.md; the socket is
# root-equivalent either way).
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 empty/ /var/lib/baker/
ENV PATH=/usr/local/bin \
    BAKER_LISTEN=0.0.0.0:7700 \
    BAKER_DATA=/var/lib/baker \
    HEALTHCHECK_URL=http://127.0.0.1:7700/healthz
USER 65532:65532
EXPOSE 7700
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["/usr/local/bin/baker-probe"]
ENTRYPOINT ["/usr/local/bin/baker-directory"]
LABEL org.opencontainers.image.title="baker/directory" \
      org.opencontainers.image.description="Baker's directory (baker-directory) and operator CLI (baker)" \
      org.opencontainers.image.source="https://github.com/baker-sd/baker" \
      org.opencontainers.image.licenses="Apache-2.0"
