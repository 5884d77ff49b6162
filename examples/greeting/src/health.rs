//! The health the greeting reports on `GET /health`, switchable at run time.

use std::fmt;
use std::str::FromStr;

use tokio::sync::watch;

/// What `GET /health` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Answer 200.
    Ok,
    /// Answer 503.
    Fail,
    /// Never answer (until the mode changes or the server stops).
    Hang,
}

impl FromStr for Health {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "ok" => Ok(Health::Ok),
            "fail" => Ok(Health::Fail),
            "hang" => Ok(Health::Hang),
            other => Err(format!(
                "health must be ok, fail or hang, got {:?}",
                baker_client::model::printable(other)
            )),
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Ok => "ok",
            Health::Fail => "fail",
            Health::Hang => "hang",
        })
    }
}

/// The current health, shared by the handlers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HealthSwitch {
    tx: watch::Sender<Health>,
}

impl Default for HealthSwitch {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(Health::Ok),
        }
    }
}

impl HealthSwitch {
    pub fn get(&self) -> Health {
        *self.tx.borrow()
    }

    /// Sets the health; returns the previous one.
    pub fn set(&self, health: Health) -> Health {
        self.tx.send_replace(health)
    }

    /// Waits until the health is not [`Health::Hang`], and returns it.
    pub async fn settled(&self) -> Health {
        let mut rx = self.tx.subscribe();
        let settled = match rx.wait_for(|h| *h != Health::Hang).await {
            Ok(h) => *h,
            // The sender lives as long as `self`, so this cannot happen; fail rather than hang.
            Err(_) => Health::Fail,
        };
        settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes() {
        assert_eq!("ok".parse::<Health>().unwrap(), Health::Ok);
        assert_eq!(" fail\n".parse::<Health>().unwrap(), Health::Fail);
        assert_eq!("hang".parse::<Health>().unwrap(), Health::Hang);
        assert!("sick".parse::<Health>().unwrap_err().contains("sick"));
    }

    #[tokio::test]
    async fn hang_waits_for_a_change() {
        let h = HealthSwitch::default();
        assert_eq!(h.set(Health::Hang), Health::Ok);
        let waiter = tokio::spawn({
            let h = h.clone();
            async move { h.settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        h.set(Health::Fail);
        assert_eq!(waiter.await.unwrap(), Health::Fail);
    }
}
