//! A chaos campaign against the local stack: rounds that each open a sale,
//! send a crowd, kill, pause, cut or slow a part of the pipeline on a
//! schedule drawn from a seed, heal it, wait until everything settled,
//! and check every promise: no purchase lost, no unit oversold, nobody
//! charged twice, every kept charge on a confirmed order, every buyer
//! told what the order says.
//!
//! `scripts/chaos` starts the stack and runs the `flashsale-chaos` binary;
//! `World` is the pipeline it acts on, `fault` the kinds of fault and
//! their schedule, `round` one round and its checks, `report` the result.

pub mod crowd;
mod durations;
pub mod fault;
pub mod report;
pub mod rng;
pub mod round;
pub mod world;

use std::time::Duration;

use crate::crowd::CrowdPlan;
use crate::fault::FaultKind;
use crate::report::Campaign;
use crate::round::{RoundPlan, RoundResult};
use crate::world::World;

/// What a campaign runs.
#[derive(Debug, Clone)]
pub struct CampaignOptions {
    pub seed: u64,
    pub rounds: u64,
    pub kinds: Vec<FaultKind>,
    /// Each round injects its own kind in turn (the short campaign), rather
    /// than one to `max_per_round` drawn at random.
    pub one_each: bool,
    pub max_per_round: usize,
    pub stock: u64,
    pub crowd: CrowdPlan,
    pub settle_within: Duration,
    /// The command line that replays the campaign, for the report.
    pub replay: String,
    /// Run only this round of the campaign (its own schedule, as in the
    /// whole campaign): a failed round replayed alone.
    pub only_round: Option<u64>,
}

/// The plan of round `index`: its sku, named by the seed and the round
/// so that no two campaigns share one, and its faults.
pub fn plan_round(options: &CampaignOptions, index: u64, run_id: &str) -> RoundPlan {
    RoundPlan {
        index,
        seed: options.seed,
        sku: format!("chaos-{run_id}-{}-r{index}", options.seed),
        stock: options.stock,
        crowd: options.crowd,
        faults: fault::schedule(
            options.seed,
            index,
            &options.kinds,
            options.max_per_round,
            options.one_each,
            options.crowd.window(),
        ),
        settle_within: options.settle_within,
    }
}

/// Runs every round on `world`, telling `each` of every round as it ends.
pub async fn run(
    world: &World,
    options: &CampaignOptions,
    mut each: impl FnMut(&RoundResult),
) -> anyhow::Result<Campaign> {
    let started = std::time::Instant::now();
    // A sku per round and per run: a replayed seed must not find the
    // sales of the run it replays.
    let run_id = format!("{:x}", flashsale_core::clock::now_ms() % 0xFFFFFF);
    let mut rounds = Vec::new();
    let indices = match options.only_round {
        Some(index) => index..index + 1,
        None => 0..options.rounds,
    };
    for index in indices {
        let plan = plan_round(options, index, &run_id);
        let result = match round::run(world, plan.clone()).await {
            Ok(result) => result,
            // The round could not even be set up (a store still down): it
            // proves nothing, and says so; the next one tries again.
            Err(error) => RoundResult::not_run(plan, format!("{error:#}")),
        };
        each(&result);
        rounds.push(result);
    }
    Ok(Campaign {
        seed: options.seed,
        replay: options.replay.clone(),
        duration_s: started.elapsed().as_secs_f64(),
        summary: report::summarize(&rounds),
        rounds,
    })
}
