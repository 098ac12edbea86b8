//! A yes/no setting read once from an environment variable (for A/B runs) and settable in
//! process (gpu-check and gpu-bench take both sides of a switch in one run).

use std::sync::atomic::{AtomicU8, Ordering};

/// The values a switch's variable takes, beside its default.
pub struct Values {
    pub on: &'static [&'static str],
    pub off: &'static [&'static str],
}

/// `1`/`on`/`true` and `0`/`off`/`false`.
pub const ON_OFF: Values = Values {
    on: &["1", "on", "true"],
    off: &["0", "off", "false"],
};

pub struct EnvSwitch {
    /// 0 = not read yet, 1 = off, 2 = on.
    state: AtomicU8,
    var: &'static str,
    /// The setting when the variable is unset (or takes none of `values`).
    default: bool,
    values: Values,
}

impl EnvSwitch {
    pub const fn new(var: &'static str, default: bool, values: Values) -> Self {
        Self {
            state: AtomicU8::new(0),
            var,
            default,
            values,
        }
    }

    /// The variable's setting: None when it is unset, or (with a warning naming `fallback`,
    /// the setting that then holds) when its value is none of the switch's.
    fn variable(&self, fallback: bool) -> Option<bool> {
        let v = std::env::var(self.var).ok()?;
        let (on, off) = (self.values.on, self.values.off);
        if on.contains(&v.as_str()) {
            return Some(true);
        }
        if off.contains(&v.as_str()) {
            return Some(false);
        }
        tracing::warn!(
            "{}={v:?} is neither on ({}) nor off ({}): {} holds",
            self.var,
            on.join(", "),
            off.join(", "),
            if fallback { "on" } else { "off" }
        );
        None
    }

    /// `set`'s value, else the variable's (read once), else the default.
    pub fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => {
                let on = self.variable(self.default).unwrap_or(self.default);
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
        self.set(self.variable(on).unwrap_or(on));
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
    use super::{EnvSwitch, ON_OFF};

    static SWITCH: EnvSwitch = EnvSwitch::new("MOEQ_TEST_SWITCH_NEVER_SET", true, ON_OFF);

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

    /// The variable's values: on, off, and one of neither (the default holds); a config's
    /// setting (`set_unless_env`) yields to a valid variable only. Each case its own variable
    /// (tests run in parallel; no other code reads these names).
    #[test]
    fn the_variable_is_read_strictly() {
        let cases = [
            ("MOEQ_TEST_SWITCH_ON", "on", true, true),
            ("MOEQ_TEST_SWITCH_ONE", "1", true, true),
            ("MOEQ_TEST_SWITCH_OFF", "off", false, false),
            ("MOEQ_TEST_SWITCH_ZERO", "0", false, false),
            // Neither: get() gives the default (off here), set_unless_env the config's (on).
            ("MOEQ_TEST_SWITCH_TYPO", "yes please", false, true),
        ];
        for (var, value, got, with_config) in cases {
            std::env::set_var(var, value);
            let s: &'static EnvSwitch = Box::leak(Box::new(EnvSwitch::new(var, false, ON_OFF)));
            assert_eq!(s.get(), got, "{var}={value}");
            s.set_unless_env(true);
            assert_eq!(s.get(), with_config, "{var}={value} against a config's on");
        }
    }
}
