//! The guard's rules: what it watches over a sliding window, and when it trips.
//!
//! The guard reads three signals: the share of shadow comparisons that disagree, the share
//! of NEW-path reads that fail, and NEW's p99 read latency against LEGACY's. A signal counts
//! only once it has `min_samples` samples in the window. Each replica keeps its own
//! [`Window`]; the trip itself is a rollout change, so one replica's trip reaches them all.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::domain::StorageSource;

/// Most samples of each kind a window holds; past it the oldest go first, so memory stays
/// bounded under any traffic.
pub const MAX_SAMPLES: usize = 65_536;

/// What the guard does when it trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardAction {
    #[default]
    /// Engage the kill switch: every read goes to LEGACY.
    KillSwitch,
    /// Step the percentage back to the schedule's last green step (0 % without a
    /// schedule). In NEW_PRIMARY, where the percentage has no effect, the kill switch.
    StepBack,
}

impl GuardAction {
    /// The name flags, the API and the audit use.
    pub fn name(self) -> &'static str {
        match self {
            GuardAction::KillSwitch => "kill-switch",
            GuardAction::StepBack => "step-back",
        }
    }

    /// The action named `name` (see [`GuardAction::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        [GuardAction::KillSwitch, GuardAction::StepBack]
            .into_iter()
            .find(|action| action.name() == name)
    }
}

/// The guard's thresholds. Fractions are kept in millionths (ppm) so that the settings
/// compare exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardSettings {
    /// Trip when more than this share of comparisons disagree.
    pub max_mismatch_ppm: u32,
    /// Trip when more than this share of NEW-path reads fail.
    pub max_error_ppm: u32,
    /// Trip when NEW's p99 read latency exceeds LEGACY's by more than this factor, in
    /// hundredths (300: three times); 0 turns the signal off.
    pub max_p99_ratio_percent: u32,
    /// Samples a signal needs in the window before it counts.
    pub min_samples: u32,
    /// The sliding window, in seconds.
    pub window_secs: u32,
    pub action: GuardAction,
    /// A user whose own reads disagree this many times in the window is pinned to LEGACY
    /// (quarantined) before anything trips for everyone; 0 turns quarantine off.
    pub quarantine_after: u32,
    /// Most users quarantined at once; one more candidate trips the guard instead (the
    /// divergence is then not one account's).
    pub max_quarantined: u32,
}

impl GuardSettings {
    pub const DEFAULT: Self = Self {
        max_mismatch_ppm: 10_000,
        max_error_ppm: 10_000,
        max_p99_ratio_percent: 0,
        min_samples: 100,
        window_secs: 60,
        action: GuardAction::KillSwitch,
        quarantine_after: 3,
        max_quarantined: 10,
    };

    pub fn window(&self) -> Duration {
        Duration::from_secs(u64::from(self.window_secs.max(1)))
    }
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for GuardSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max mismatch {}, max NEW errors {}, max p99 ratio {}, min samples {}, window {} s, \
             action {}, quarantine after {} (at most {})",
            ppm_percent(self.max_mismatch_ppm),
            ppm_percent(self.max_error_ppm),
            match self.max_p99_ratio_percent {
                0 => "off".to_owned(),
                r => format!("{:.2}×", f64::from(r) / 100.0),
            },
            self.min_samples,
            self.window_secs,
            self.action.name(),
            match self.quarantine_after {
                0 => "off".to_owned(),
                n => format!("{n} mismatches"),
            },
            self.max_quarantined,
        )
    }
}

/// A fraction from 0 to 1 in millionths (clamped to that range).
pub fn ppm(fraction: f64) -> u32 {
    (fraction.clamp(0.0, 1.0) * 1e6).round() as u32
}

/// Millionths as a fraction.
pub fn fraction(ppm: u32) -> f64 {
    f64::from(ppm) / 1e6
}

fn ppm_percent(ppm: u32) -> String {
    format!("{:.2}%", f64::from(ppm) / 10_000.0)
}

/// The signal that tripped the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    MismatchRate,
    ErrorRate,
    P99Ratio,
    /// More users needed quarantine than `max_quarantined`.
    Quarantines,
}

impl Signal {
    /// The name in metrics and the audit.
    pub fn name(self) -> &'static str {
        match self {
            Signal::MismatchRate => "mismatch_rate",
            Signal::ErrorRate => "error_rate",
            Signal::P99Ratio => "p99_ratio",
            Signal::Quarantines => "quarantines",
        }
    }

    pub const ALL: [Signal; 4] = [
        Signal::MismatchRate,
        Signal::ErrorRate,
        Signal::P99Ratio,
        Signal::Quarantines,
    ];
}

/// What a window holds now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Figures {
    pub comparisons: u64,
    pub mismatches: u64,
    pub new_reads: u64,
    pub new_errors: u64,
    pub legacy_reads: u64,
    pub new_p99: Option<Duration>,
    pub legacy_p99: Option<Duration>,
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl Figures {
    pub fn mismatch_rate(&self) -> f64 {
        rate(self.mismatches, self.comparisons)
    }

    pub fn error_rate(&self) -> f64 {
        rate(self.new_errors, self.new_reads)
    }

    /// NEW's p99 over LEGACY's, when both are known.
    pub fn p99_ratio(&self) -> Option<f64> {
        match (self.new_p99, self.legacy_p99) {
            (Some(new), Some(legacy)) if !legacy.is_zero() => {
                Some(new.as_secs_f64() / legacy.as_secs_f64())
            }
            _ => None,
        }
    }

    /// The first signal past its threshold, among those with enough samples.
    pub fn crossed(&self, settings: &GuardSettings) -> Option<Signal> {
        let min = u64::from(settings.min_samples.max(1));
        let over = |value: f64, ppm: u32| value * 1e6 > f64::from(ppm);
        if self.comparisons >= min && over(self.mismatch_rate(), settings.max_mismatch_ppm) {
            return Some(Signal::MismatchRate);
        }
        if self.new_reads >= min && over(self.error_rate(), settings.max_error_ppm) {
            return Some(Signal::ErrorRate);
        }
        let enough = self.new_reads - self.new_errors >= min && self.legacy_reads >= min;
        match self.p99_ratio() {
            Some(ratio)
                if settings.max_p99_ratio_percent > 0
                    && enough
                    && ratio * 100.0 > f64::from(settings.max_p99_ratio_percent) =>
            {
                Some(Signal::P99Ratio)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_owned(), |d| {
                format!("{:.2} ms", d.as_secs_f64() * 1e3)
            })
        };
        write!(
            f,
            "mismatches {} of {} comparisons ({:.2}%), NEW errors {} of {} reads ({:.2}%), \
             p99 NEW {} vs LEGACY {}",
            self.mismatches,
            self.comparisons,
            self.mismatch_rate() * 100.0,
            self.new_errors,
            self.new_reads,
            self.error_rate() * 100.0,
            ms(self.new_p99),
            ms(self.legacy_p99),
        )?;
        if let Some(ratio) = self.p99_ratio() {
            write!(f, " ({ratio:.2}×)")?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Comparison {
    at: Instant,
    user: Arc<str>,
    mismatch: bool,
}

#[derive(Debug)]
struct Read {
    at: Instant,
    latency: Duration,
    failed: bool,
}

/// One replica's samples over the sliding window.
#[derive(Debug, Default)]
pub struct Window {
    comparisons: VecDeque<Comparison>,
    new_reads: VecDeque<Read>,
    legacy_reads: VecDeque<Read>,
    /// Comparisons ever seen (the schedule counts a step's from it).
    compared_total: u64,
}

fn push_bounded<T>(samples: &mut VecDeque<T>, sample: T) {
    if samples.len() == MAX_SAMPLES {
        samples.pop_front();
    }
    samples.push_back(sample);
}

fn p99(reads: &VecDeque<Read>) -> Option<Duration> {
    let mut latencies: Vec<Duration> = reads
        .iter()
        .filter(|r| !r.failed)
        .map(|r| r.latency)
        .collect();
    if latencies.is_empty() {
        return None;
    }
    let at = (latencies.len() * 99).div_ceil(100) - 1;
    Some(*latencies.select_nth_unstable(at).1)
}

impl Window {
    /// One shadow comparison of `user`'s read (the all-users view is `*`).
    pub fn compared(&mut self, at: Instant, user: &str, mismatch: bool) {
        self.compared_total += 1;
        push_bounded(
            &mut self.comparisons,
            Comparison {
                at,
                user: Arc::from(user),
                mismatch,
            },
        );
    }

    /// One read of `source` (a primary read or a shadow read).
    pub fn read(&mut self, at: Instant, source: StorageSource, latency: Duration, failed: bool) {
        let reads = match source {
            StorageSource::New => &mut self.new_reads,
            StorageSource::Legacy => &mut self.legacy_reads,
        };
        push_bounded(
            reads,
            Read {
                at,
                latency,
                failed,
            },
        );
    }

    /// Comparisons seen since this window was made.
    pub fn compared_total(&self) -> u64 {
        self.compared_total
    }

    /// Forgets every sample (after a trip, or when the guard is re-armed).
    pub fn clear(&mut self) {
        self.comparisons.clear();
        self.new_reads.clear();
        self.legacy_reads.clear();
    }

    /// Forgets `user`'s comparisons (once quarantined, they no longer speak for everyone).
    pub fn forget_user(&mut self, user: &str) {
        self.comparisons.retain(|c| &*c.user != user);
    }

    fn trim(&mut self, now: Instant, window: Duration) {
        let Some(since) = now.checked_sub(window) else {
            return;
        };
        while self.comparisons.front().is_some_and(|c| c.at < since) {
            self.comparisons.pop_front();
        }
        for reads in [&mut self.new_reads, &mut self.legacy_reads] {
            while reads.front().is_some_and(|r| r.at < since) {
                reads.pop_front();
            }
        }
    }

    /// The window's figures at `now`, leaving out comparisons of users `excluded` says.
    pub fn figures(
        &mut self,
        now: Instant,
        window: Duration,
        excluded: impl Fn(&str) -> bool,
    ) -> Figures {
        self.trim(now, window);
        let counted = self.comparisons.iter().filter(|c| !excluded(&c.user));
        let (comparisons, mismatches) =
            counted.fold((0, 0), |(n, m), c| (n + 1, m + u64::from(c.mismatch)));
        Figures {
            comparisons,
            mismatches,
            new_reads: self.new_reads.len() as u64,
            new_errors: self.new_reads.iter().filter(|r| r.failed).count() as u64,
            legacy_reads: self.legacy_reads.len() as u64,
            new_p99: p99(&self.new_reads),
            legacy_p99: p99(&self.legacy_reads),
        }
    }

    /// Users with at least `mismatches` disagreeing comparisons in the window, most first,
    /// leaving out those `excluded` says.
    pub fn repeat_offenders(
        &self,
        mismatches: u32,
        excluded: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        if mismatches == 0 {
            return Vec::new();
        }
        let mut per_user: HashMap<&str, u32> = HashMap::new();
        for c in self.comparisons.iter().filter(|c| c.mismatch) {
            *per_user.entry(&c.user).or_default() += 1;
        }
        let mut offenders: Vec<(&str, u32)> = per_user
            .into_iter()
            .filter(|(user, n)| *n >= mismatches && !excluded(user))
            .collect();
        offenders.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        offenders.into_iter().map(|(u, _)| u.to_owned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> GuardSettings {
        GuardSettings {
            min_samples: 10,
            ..GuardSettings::DEFAULT
        }
    }

    #[test]
    fn a_signal_counts_only_with_enough_samples() {
        let now = Instant::now();
        let mut window = Window::default();
        for _ in 0..9 {
            window.compared(now, "u", true);
        }
        let figures = window.figures(now, Duration::from_secs(60), |_| false);
        assert_eq!(figures.crossed(&settings()), None, "9 < min samples");
        window.compared(now, "u", true);
        let figures = window.figures(now, Duration::from_secs(60), |_| false);
        assert_eq!(figures.crossed(&settings()), Some(Signal::MismatchRate));
    }

    #[test]
    fn the_rate_must_exceed_the_threshold() {
        let now = Instant::now();
        let mut window = Window::default();
        // 1 of 100 is exactly 1 %: not above the default 1 %.
        for i in 0..100 {
            window.compared(now, "u", i == 0);
        }
        let figures = window.figures(now, Duration::from_secs(60), |_| false);
        assert_eq!(figures.crossed(&settings()), None);
        window.compared(now, "u", true);
        let figures = window.figures(now, Duration::from_secs(60), |_| false);
        assert_eq!(figures.crossed(&settings()), Some(Signal::MismatchRate));
    }

    #[test]
    fn old_samples_leave_the_window_and_excluded_users_do_not_count() {
        let start = Instant::now();
        let mut window = Window::default();
        for _ in 0..20 {
            window.compared(start, "bad", true);
        }
        let later = start + Duration::from_secs(61);
        for _ in 0..20 {
            window.compared(later, "good", false);
        }
        let figures = window.figures(later, Duration::from_secs(60), |_| false);
        assert_eq!((figures.comparisons, figures.mismatches), (20, 0));
        window.compared(later, "bad", true);
        let figures = window.figures(later, Duration::from_secs(60), |u| u == "bad");
        assert_eq!((figures.comparisons, figures.mismatches), (20, 0));
        assert_eq!(window.compared_total(), 41);
    }

    #[test]
    fn errors_and_latency_of_the_new_path_trip() {
        let now = Instant::now();
        let mut window = Window::default();
        for i in 0..20 {
            window.read(now, StorageSource::New, Duration::from_millis(1), i < 2);
        }
        let figures = window.figures(now, Duration::from_secs(60), |_| false);
        assert_eq!(figures.crossed(&settings()), Some(Signal::ErrorRate));

        let mut window = Window::default();
        for _ in 0..20 {
            window.read(now, StorageSource::New, Duration::from_millis(40), false);
            window.read(now, StorageSource::Legacy, Duration::from_millis(10), false);
        }
        let figures = window.figures(now, Duration::from_secs(60), |_| false);
        assert_eq!(figures.p99_ratio(), Some(4.0));
        assert_eq!(
            figures.crossed(&settings()),
            None,
            "the ratio is off by default"
        );
        let strict = GuardSettings {
            max_p99_ratio_percent: 300,
            ..settings()
        };
        assert_eq!(figures.crossed(&strict), Some(Signal::P99Ratio));
    }

    #[test]
    fn repeat_offenders_are_found_and_forgotten() {
        let now = Instant::now();
        let mut window = Window::default();
        for _ in 0..3 {
            window.compared(now, "bad", true);
        }
        window.compared(now, "once", true);
        window.compared(now, "good", false);
        assert_eq!(window.repeat_offenders(3, |_| false), ["bad"]);
        assert!(window.repeat_offenders(3, |u| u == "bad").is_empty());
        assert!(window.repeat_offenders(0, |_| false).is_empty());
        window.forget_user("bad");
        let figures = window.figures(now, Duration::from_secs(60), |_| false);
        assert_eq!((figures.comparisons, figures.mismatches), (2, 1));
    }

    #[test]
    fn windows_stay_bounded() {
        let now = Instant::now();
        let mut window = Window::default();
        for _ in 0..MAX_SAMPLES + 10 {
            window.compared(now, "u", false);
        }
        let figures = window.figures(now, Duration::from_secs(60), |_| false);
        assert_eq!(figures.comparisons, MAX_SAMPLES as u64);
    }

    #[test]
    fn actions_round_trip_their_names() {
        for action in [GuardAction::KillSwitch, GuardAction::StepBack] {
            assert_eq!(GuardAction::from_name(action.name()), Some(action));
        }
        assert_eq!(GuardAction::from_name("panic"), None);
    }
}
