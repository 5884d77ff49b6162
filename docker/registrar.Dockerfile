# baker/registrar: the sidecar that probes one app and keeps it registered while healthy.
# Built by docker/build.sh, which stages rootfs/ (binaries, the libraries ldd names, /etc, /tmp).
#
#   docker run --link myapp:app -e BAKER_SERVICE=emitter \
#       -e BAKER_DIRECTORY=http://directory:7700 baker/registrar
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin
USER 65532:65532
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/baker-registrar"]
LABEL org.opencontainers.image.title="baker/registrar" \
      org.opencontainers.image.description="Baker's registrar sidecar (baker-registrar)" \
      org.opencontainers.image.source="https://github.com/baker-sd/baker" \
      org.opencontainers.image.licenses="Apache-2.0"
