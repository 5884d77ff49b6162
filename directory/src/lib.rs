//! Baker's directory: the rendezvous of live instances and canary routes
