//! The rollout decision runs on every read: it must not allocate. Proven by counting the
//! allocations of this thread (a test binary of its own, so the counting allocator touches
//! no other test).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;

use campaign_stats::domain::StorageSource;
use campaign_stats::migration::Phase;
use campaign_stats::rollout::{RolloutConfig, decide};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only a
// const-initialised thread-local without a destructor.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn a_rollout_decision_allocates_nothing() {
    let config = RolloutConfig {
        basis_points: 2_500,
        kill_switch: false,
        salt: "0196f1c2-7a3b-7cc1-9d1e-2f3a4b5c6d7e".into(),
        version: 9,
        shadow_sample_ppm: None,
        automation: Default::default(),
    };
    let killed = RolloutConfig {
        kill_switch: true,
        ..config.clone()
    };
    let overrides: HashMap<String, StorageSource> = [
        ("beta-3".to_owned(), StorageSource::New),
        ("beta-7".to_owned(), StorageSource::Legacy),
    ]
    .into();
    // Every user id is made before counting starts.
    let users: Vec<String> = (0..2_000)
        .map(|i| format!("beta-{i}-{}", "x".repeat(i % 70)))
        .chain(["beta-3".to_owned(), "beta-7".to_owned(), String::new()])
        .collect();

    let before = allocations();
    let mut on_new = 0_usize;
    for phase in Phase::ALL {
        for config in [&config, &killed] {
            for user in &users {
                let user_override = overrides.get(user.as_str()).copied();
                let decision = decide(phase, config, user_override, user);
                on_new += usize::from(decision.source == StorageSource::New);
            }
        }
    }
    let allocated = allocations() - before;

    assert_eq!(allocated, 0, "{allocated} allocations in decisions");
    // The loop did decide (and was not optimised away): some reads went each way.
    assert!(on_new > 0 && on_new < Phase::ALL.len() * 2 * users.len());
    // The counter does count on this thread.
    let probe = allocations();
    drop(std::hint::black_box(vec![1_u8; 32]));
    assert_eq!(allocations(), probe + 1);
}
