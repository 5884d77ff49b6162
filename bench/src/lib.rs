//! Baker's benchmark harness
