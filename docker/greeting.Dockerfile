# baker/greeting: the Greeting example service (and its client), FROM scratch.
# Built by docker/build.sh, which stages rootfs/ (binaries, the libraries ldd names, /etc, /tmp).
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin \
    HEALTHCHECK_URL=http://127.0.0.1:8080/health
USER 65532:65532
EXPOSE 8080
STOPSIGNAL SIGTERM
# Exec form (there is no shell): set HEALTHCHECK_URL when BAKER_LISTEN moves the port.
HEALTHCHECK --interval=2s --timeout=2s --start-period=5s --retries=2 CMD ["/usr/local/bin/baker-probe"]
ENTRYPOINT ["/usr/local/bin/baker-greeting"]
LABEL org.opencontainers.image.title="baker/greeting" \
      org.opencontainers.image.description="Baker's Greeting example service (GET /greeting, GET /health) and baker-greeting-client" \
      org.opencontainers.image.source="https://github.com/baker-sd/baker" \
      org.opencontainers.image.licenses="Apache-2.0"
