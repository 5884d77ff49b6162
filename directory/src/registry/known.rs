//! The services the directory has seen, as far as it remembers them.
//!
//! A route for a service that never had a live instance is likely a misspelt name, so setting
//! one needs `force` ([`super::Registry::knows`]). Remembering every service ever seen would grow
//! with every name a client sends; [`Known`] keeps at most a fixed number, forgetting first the
//! one whose last instance went longest ago. A service with live instances or a route is known
//! whatever this remembers.

use std::collections::{BTreeMap, HashMap};

use baker_client::model::ServiceName;

/// Services seen, at most `limit` of them, the least recently seen forgotten first.
#[derive(Debug)]
pub struct Known {
    /// Each service and when it was last noted.
    noted: HashMap<ServiceName, u64>,
    /// The same, by when it was noted, oldest first.
    order: BTreeMap<u64, ServiceName>,
    next: u64,
    limit: usize,
}

impl Known {
    /// Remembers at most `limit` services (at least one).
    pub fn new(limit: usize) -> Known {
        Known {
            noted: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
            limit: limit.max(1),
        }
    }

    /// Notes `service` if it is not remembered (a lookup when it is: called on every
    /// heartbeat).
    pub fn note(&mut self, service: &ServiceName) {
        if !self.noted.contains_key(service) {
            self.touch(service);
        }
    }

    /// Notes `service` as seen now, whether or not it was remembered: when its last instance
    /// goes, so that it is forgotten last.
    pub fn touch(&mut self, service: &ServiceName) {
        self.next += 1;
        if let Some(old) = self.noted.insert(service.clone(), self.next) {
            self.order.remove(&old);
        }
        self.order.insert(self.next, service.clone());
        while self.noted.len() > self.limit {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.noted.remove(&oldest);
        }
    }

    /// How many services are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.noted.len()
    }

    /// Whether `service` is remembered.
    pub fn contains(&self, service: &ServiceName) -> bool {
        self.noted.contains_key(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    #[test]
    fn remembers_at_most_its_limit_forgetting_the_least_recently_seen() {
        let mut k = Known::new(2);
        k.note(&svc("a"));
        k.note(&svc("b"));
        k.note(&svc("a"));
        k.note(&svc("c"));
        assert!(
            !k.contains(&svc("a")),
            "a was noted first, and noting it again moves nothing"
        );
        assert!(k.contains(&svc("b")) && k.contains(&svc("c")));
        k.touch(&svc("b"));
        k.note(&svc("d"));
        assert!(k.contains(&svc("b")) && k.contains(&svc("d")));
        assert!(!k.contains(&svc("c")));
        assert_eq!((k.noted.len(), k.order.len()), (2, 2));
    }
}
