//! The Greeting example service, for demos and tests
