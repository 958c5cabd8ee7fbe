//! The migration from the legacy wide table to the new storage: its phases and the rules
//! that tie reads and writes to them.

mod phase;

pub use phase::{
    Phase, PhaseState, PreconditionFacts, Transition, TransitionRefused, WriteTargets,
};
