//! Baker's registrar: the sidecar that probes one app and keeps it registered
