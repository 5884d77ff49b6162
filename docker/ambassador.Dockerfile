# baker/ambassador: HAProxy kept in step with the directory, FROM scratch.
# Built by docker/build.sh, which stages rootfs/ (baker-ambassador, /usr/sbin/haproxy, the
# libraries ldd names for both, /etc, /tmp).
#
# The service ports come from BAKER_ROUTES at run time. 8000-8010 are EXPOSEd so that
# `docker run --link <ambassador>:emitter app` on the default bridge injects
# EMITTER_PORT_8000_TCP and friends (engines before 29); for other ports add `--expose <port>`.
# The HEALTHCHECK asks the admin port (BAKER_ADMIN, default 8404) for /ambassador/status, which
# HAProxy answers through the ambassador: both must be up. Set HEALTHCHECK_URL if it moves.
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 empty/ /run/baker/
ENV PATH=/usr/local/bin:/usr/sbin \
    BAKER_HAPROXY=/usr/sbin/haproxy \
    BAKER_RUN_DIR=/run/baker \
    HEALTHCHECK_URL=http://127.0.0.1:8404/ambassador/status
USER 65532:65532
EXPOSE 8000-8010
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["/usr/local/bin/baker-probe"]
ENTRYPOINT ["/usr/local/bin/baker-ambassador"]
LABEL org.opencontainers.image.title="baker/ambassador" \
      org.opencontainers.image.description="Baker's ambassador (baker-ambassador) with HAProxy" \
      org.opencontainers.image.source="https://github.com/baker-sd/baker" \
      org.opencontainers.image.licenses="Apache-2.0"
