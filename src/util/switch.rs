//! A yes/no setting read once from an environment variable (for A/B runs) and settable in
//! process (gpu-check and gpu-bench take both sides of a switch in one run).

use std::sync::atomic::{AtomicU8, Ordering};

pub struct EnvSwitch {
    /// 0 = not read yet, 1 = off, 2 = on.
    state: AtomicU8,
    var: &'static str,
    /// The setting from the variable's value (`None`: unset or not UTF-8).
    read: fn(Option<&str>) -> bool,
}

impl EnvSwitch {
    pub const fn new(var: &'static str, read: fn(Option<&str>) -> bool) -> Self {
        Self {
            state: AtomicU8::new(0),
            var,
            read,
        }
    }

    /// `set`'s value, else the variable's (read once).
    pub fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => {
                let on = (self.read)(std::env::var(self.var).ok().as_deref());
                self.set(on);
                on
            }
        }
    }

    pub fn set(&self, on: bool) {
        self.state.store(if on { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// Sets the switch unless its variable is given (a config key's setting, which an A/B run's
    /// variable overrides).
    pub fn set_unless_env(&self, on: bool) {
        if std::env::var_os(self.var).is_none() {
            self.set(on);
        }
    }

    /// Sets the switch until the guard drops, then puts back what it was (gpu-check turns a
    /// kernel on for its rows however they end).
    pub fn scoped(&'static self, on: bool) -> Scoped {
        let was = self.get();
        self.set(on);
        Scoped { switch: self, was }
    }
}

/// A switch's setting for a scope (`EnvSwitch::scoped`).
#[must_use = "the setting lasts only while the guard lives"]
pub struct Scoped {
    switch: &'static EnvSwitch,
    was: bool,
}

impl Drop for Scoped {
    fn drop(&mut self) {
        self.switch.set(self.was);
    }
}

#[cfg(test)]
mod tests {
    use super::EnvSwitch;

    static SWITCH: EnvSwitch = EnvSwitch::new("MOEQ_TEST_SWITCH_NEVER_SET", |v| v != Some("0"));

    #[test]
    fn unset_gives_the_default_and_set_overrides_it() {
        // Unset: the reader's default (on); `set` overrides it either way.
        assert!(SWITCH.get());
        SWITCH.set(false);
        assert!(!SWITCH.get());
        SWITCH.set(true);
        assert!(SWITCH.get());
        {
            let _off = SWITCH.scoped(false);
            assert!(!SWITCH.get());
        }
        assert!(SWITCH.get(), "the scope's end puts the setting back");
    }
}
