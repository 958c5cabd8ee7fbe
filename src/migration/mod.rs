//! The migration from the legacy wide table to the new storage: its phases and the rules
//! that tie reads and writes to them.

pub mod ambiguous;
pub mod backfill;
pub mod generate;
mod phase;
mod run;
pub mod verify;

pub use phase::{
    Phase, PhaseState, PreconditionFacts, Transition, TransitionRefused, WriteTargets,
};
pub use run::{Run, RunIssue, RunKind, RunState};
