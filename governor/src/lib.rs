//! gemmad-governor: what the device says (memory, pressure, the service's cgroup, heat,
//! power) and what the service should do about it. Sensors read procfs/sysfs/cgroup
//! trees under configurable roots; the policy turns readings into a tier (with
//! hysteresis and dwell times) and the tier into actions. No model code and no IPC: the
//! daemon runs the loop and applies the actions through the engine's control path.

pub mod policy;
pub mod sensors;

use std::path::PathBuf;

use serde::Deserialize;

pub use policy::{Action, Policy, PolicyConfig, Tier, TierSettings};
pub use sensors::{Readings, Sensors};

/// `[governor]` of the daemon's config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GovernorConfig {
    /// Run the governor loop.
    pub enabled: bool,
    /// Where procfs is mounted (tests point it at a fake tree).
    pub procfs_root: PathBuf,
    /// Where sysfs is mounted.
    pub sysfs_root: PathBuf,
    /// The daemon's cgroup directory; default: its own, from `/proc/self/cgroup`.
    pub cgroup_dir: Option<PathBuf>,
    /// Poll interval of the sensors, milliseconds. PSI triggers, `memory.events` changes
    /// (cgroup2) and UPower signals wake it earlier; 500 bounds the rest (sysfs battery,
    /// heat, MemAvailable).
    pub interval_ms: u64,
    /// Read on-battery and the battery warning level from UPower on the system bus when
    /// it runs there (they then take precedence over sysfs `power_supply`).
    pub upower: bool,
    /// Tiers, thresholds and what each tier does.
    pub policy: PolicyConfig,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        GovernorConfig {
            enabled: true,
            procfs_root: PathBuf::from("/proc"),
            sysfs_root: PathBuf::from("/sys"),
            cgroup_dir: None,
            interval_ms: 500,
            upower: true,
            policy: PolicyConfig::default(),
        }
    }
}
