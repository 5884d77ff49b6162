# baker/etcd: one etcd v3 member (Debian's etcd-server binary), FROM scratch, for directory
# replicas that share a table. Built by docker/build.sh, which stages rootfs/ (the host's
# /usr/bin/etcd, the libraries ldd names, baker-probe for the HEALTHCHECK, /etc, /tmp).
#
# Configure it with etcd's own ETCD_* variables or flags (ETCD_NAME, ETCD_INITIAL_CLUSTER,
# ETCD_LISTEN_CLIENT_URLS, ...). By default it is a single member listening on every address,
# with its data in /var/lib/etcd (mount a volume there to keep it).
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 empty/ /var/lib/etcd/
ENV PATH=/usr/local/bin:/usr/bin \
    ETCD_NAME=default \
    ETCD_DATA_DIR=/var/lib/etcd \
    ETCD_LISTEN_CLIENT_URLS=http://0.0.0.0:2379 \
    ETCD_ADVERTISE_CLIENT_URLS=http://127.0.0.1:2379 \
    ETCD_LISTEN_PEER_URLS=http://0.0.0.0:2380 \
    ETCD_INITIAL_ADVERTISE_PEER_URLS=http://127.0.0.1:2380 \
    ETCD_INITIAL_CLUSTER=default=http://127.0.0.1:2380 \
    HEALTHCHECK_URL=http://127.0.0.1:2379/health
USER 65532:65532
EXPOSE 2379 2380
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=2s --timeout=2s --start-period=10s --retries=3 CMD ["/usr/local/bin/baker-probe"]
ENTRYPOINT ["/usr/bin/etcd"]
LABEL org.opencontainers.image.title="baker/etcd" \
      org.opencontainers.image.description="An etcd v3 member (Debian's etcd-server) for Baker's directory replicas" \
      org.opencontainers.image.source="https://github.com/baker-sd/baker" \
      org.opencontainers.image.licenses="Apache-2.0"
