//! Baker's ambassador: a local HAProxy kept live from the directory
