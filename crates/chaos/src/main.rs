//! `flashsale-chaos`: runs a chaos campaign against a running local stack
//! (`scripts/chaos` starts one and runs this).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use flashsale_chaos::crowd::CrowdPlan;
use flashsale_chaos::fault::{self, FaultKind};
use flashsale_chaos::world::{World, WorldConfig};
use flashsale_chaos::{CampaignOptions, report};
use flashsale_core::service::settings::Env;

/// Kill, pause, cut or slow any part of the pipeline mid-sale, round after
/// round, and check after each round that nothing was lost: every 202
/// terminal, no unit oversold, nobody charged twice, every kept charge on
/// a confirmed order, every buyer told what the order says.
///
/// Runs against the stack `scripts/chaos` starts (its own ports and state
/// dir); the services are started here, behind fault proxies.
/// Exit status: 0 every round passed, 1 a round broke a promise, 2 the
/// campaign could not run.
#[derive(Debug, Parser)]
#[command(name = "flashsale-chaos", version)]
struct Cli {
    /// How many rounds.
    #[arg(long, default_value_t = 26)]
    rounds: u64,
    /// The seed of the fault schedule: the same seed replays the same
    /// faults at the same moments (default: drawn from the clock, and
    /// printed).
    #[arg(long)]
    seed: Option<u64>,
    /// The kinds of fault to draw from, comma-separated, or `all`.
    #[arg(long, default_value = "all")]
    faults: String,
    /// At most this many faults in one round (on different parts).
    #[arg(long, default_value_t = 2)]
    max_faults: usize,
    /// One fault per round, each kind in turn (rounds = kinds covers all).
    #[arg(long)]
    one_each: bool,
    /// The short campaign of the test suite: one round per kind, one fault
    /// each, a small crowd.
    #[arg(long)]
    short: bool,
    /// Units on sale in each round.
    #[arg(long, default_value_t = 60)]
    stock: u64,
    /// Buyers at the opening of each round (fewer than the stock, so that
    /// units are still being sold while the faults strike).
    #[arg(long, default_value_t = 20)]
    burst: u64,
    /// Then buyers per second...
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// ...for this many seconds (faults start within this window).
    #[arg(long, default_value_t = 8.0)]
    rate_secs: f64,
    /// How long after the last heal a round must have settled.
    #[arg(long, default_value_t = 90.0)]
    settle_secs: f64,
    /// Run only round N of the campaign these options describe (a failed
    /// round replayed alone, with the schedule it had).
    #[arg(long, value_name = "N")]
    round: Option<u64>,
    /// Write the campaign as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the campaign as an HTML page here.
    #[arg(long)]
    html: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        flashsale_core::service::ops::init_tracing();
    }
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("flashsale-chaos: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let kinds: Vec<FaultKind> = fault::parse_list(&cli.faults)?;
    anyhow::ensure!(!kinds.is_empty(), "--faults names no fault");
    let seed = cli
        .seed
        .unwrap_or_else(|| flashsale_core::clock::now_ms() % 1_000_000);
    let (rounds, one_each, crowd, stock) = if cli.short {
        // 33 buyers for 25 units: still buying through the fault window.
        let crowd = CrowdPlan {
            burst: 8,
            rate: 5.0,
            rate_for: Duration::from_secs(5),
            patience: Duration::from_secs(30),
        };
        (kinds.len() as u64, true, crowd, 25)
    } else {
        let crowd = CrowdPlan {
            burst: cli.burst,
            rate: cli.rate,
            rate_for: Duration::from_secs_f64(cli.rate_secs),
            patience: Duration::from_secs(30),
        };
        (cli.rounds, cli.one_each, crowd, cli.stock)
    };
    let faults: Vec<String> = kinds.iter().map(ToString::to_string).collect();
    let replay = if cli.short {
        format!(
            "scripts/chaos --short --seed {seed} --faults {}",
            faults.join(",")
        )
    } else {
        format!(
            "scripts/chaos --rounds {rounds} --seed {seed} --faults {} --max-faults {}{} --stock {stock} --burst {} --rate {} --rate-secs {}",
            faults.join(","),
            cli.max_faults,
            if one_each { " --one-each" } else { "" },
            crowd.burst,
            crowd.rate,
            crowd.rate_for.as_secs_f64()
        )
    };
    let options = CampaignOptions {
        seed,
        rounds,
        kinds,
        one_each,
        max_per_round: cli.max_faults,
        stock,
        crowd,
        settle_within: Duration::from_secs_f64(cli.settle_secs),
        replay,
        only_round: cli.round,
    };
    eprintln!("chaos: seed {seed}, {rounds} rounds; starting the services");
    let world = World::start(WorldConfig::from_env(&Env::process())?).await?;
    let campaign = flashsale_chaos::run(&world, &options, |round| {
        eprintln!("{}", report::round_line(round));
    })
    .await;
    world.shutdown().await;
    let campaign = campaign?;
    print!("{}", campaign.human());
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_vec_pretty(&campaign)?)?;
    }
    if let Some(path) = &cli.html {
        std::fs::write(path, report::html(&campaign))?;
    }
    Ok(campaign.passed())
}
