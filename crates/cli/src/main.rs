//! `flashsale`: the operator's and load-tester's command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flashsale_cli::crowd::{Arrival, Replay, Stages};
use flashsale_cli::sale::{self, SaleSpec};
use flashsale_cli::surge::{self, SkuPlan, SurgeOptions};
use flashsale_cli::thresholds::{self, Threshold};
use flashsale_cli::{Config, Stores};
use flashsale_core::ids::Sku;
use flashsale_core::service::settings::Env;
use flashsale_core::{bus::kafka, service::ops};

/// Set up, audit and load-test a flashsale pipeline.
///
/// Every command finds the pipeline through the same FLASHSALE_* settings as
/// the services (see the README); the defaults reach the local stack that
/// ./scripts/demo starts.
#[derive(Parser)]
#[command(name = "flashsale", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the Kafka topics and DynamoDB tables (services do it too, at start).
    Setup {
        /// Change nothing: say whether the topics, tables and Redis are shaped
        /// as the services expect, and what differs (then it fails).
        #[arg(long)]
        check: bool,
    },
    /// Create, inspect, restock or close a sale.
    #[command(subcommand)]
    Sale(SaleCommand),
    /// Inspect one purchase's order.
    #[command(subcommand)]
    Order(OrderCommand),
    /// Check DESIGN.md's invariants across Redis, DynamoDB and the payment
    /// service; exit 1 with the list of violations.
    Audit {
        /// Only these skus (repeatable); default: every sale.
        #[arg(long)]
        sku: Vec<String>,
        /// Also require a settled sale: nothing reserved, no order half-way.
        #[arg(long)]
        at_rest: bool,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a crowd of buyers at the gateway, wait for every purchase to
    /// settle, audit, and report. Exits 0 when all held, 1 when the audit
    /// found violations or purchases did not settle, 3 when only a
    /// --threshold failed, 2 on errors.
    Surge(Box<SurgeArgs>),
    /// Work with saved surge reports (`surge --json`).
    #[command(subcommand)]
    Report(ReportCommand),
    /// How far the consumer groups are behind: per topic and partition the
    /// end offset, the committed offset, the lag in messages and in seconds
    /// (age of the oldest record not consumed), and the member that owns
    /// it; per group its state and members. Works against any Kafka-API
    /// broker.
    Lag {
        /// Repeatable; default: the shop-workers' and order-workers' groups.
        #[arg(long)]
        group: Vec<String>,
        /// Topics to look at besides those the group is known to consume
        /// and those its members own (repeatable).
        #[arg(long)]
        topic: Vec<String>,
        /// Also describe each group (state, members, who owns which
        /// partition). Off by default: tansu 0.6 cannot describe a group,
        /// and its group then stops handing out partitions.
        #[arg(long)]
        members: bool,
        /// Print again every 2 s until interrupted.
        #[arg(long)]
        watch: bool,
        /// Print JSON (one document per reading).
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a sku's stock in Redis after Redis was lost, from DynamoDB
    /// (inventory and orders) and the reservations the order stage has not
    /// processed yet. Workers wait for it: until it ran, every stock script
    /// of the sku answers "unloaded".
    Recover {
        /// Repeatable; default: every sale in DynamoDB that Redis lacks.
        #[arg(long)]
        sku: Vec<String>,
        /// Rebuild even though Redis still holds the sku (replaces it).
        /// Refused while shop- or order-workers are running (they are
        /// named): stop them first, or they would sell beside the rebuild.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum OrderCommand {
    /// The order (status, reason, payment id, when each step happened), its
    /// charge at the payment service, and what the buyer is shown, as JSON.
    /// Exit 1 if nothing knows the id.
    Show {
        /// The request id (= order id = payment idempotency key).
        id: String,
    },
}

#[derive(Subcommand)]
enum SaleCommand {
    /// Create a sale. A sku whose sale is still open is refused unless
    /// --replace (new sale id, fresh stock, per-user counts forgotten).
    Create {
        #[arg(long)]
        sku: String,
        /// Units on sale.
        #[arg(long)]
        stock: u64,
        /// Units one buyer may hold (reserved or bought) at once.
        #[arg(long, default_value_t = 1)]
        per_user_limit: u64,
        #[arg(long, default_value_t = 1999)]
        price_cents: u64,
        /// How long a reservation waits for payment before the expiry
        /// sweep gives its units back.
        #[arg(long, default_value_t = 600)]
        reservation_ttl_secs: u64,
        /// The sale opens this long from now. Buyers who come before take a
        /// place in its line, in the order of a draw among them, and are
        /// served at the opening.
        #[arg(long, default_value_t = 0)]
        start_in_secs: u64,
        /// How long the sale stays open once it opened.
        #[arg(long, default_value_t = 3600)]
        duration_secs: u64,
        /// Buyers per unit not yet sold who may hold one or wait in the
        /// sku's line for one: at most ceil(units not sold x overbook) at
        /// once; past that, purchases are answered 409 sold-out. Above 1 so
        /// that a unit given back (declined, expired) finds a buyer waiting.
        #[arg(long, default_value_t = flashsale_core::stock::DEFAULT_OVERBOOK)]
        overbook: f64,
        /// Replace the sku's open sale.
        #[arg(long)]
        replace: bool,
    },
    /// Show a sale's rules (DynamoDB) and stock (Redis) as JSON.
    Show {
        #[arg(long)]
        sku: String,
    },
    /// Add units to a running sale: they go to the buyers waiting in its
    /// line first, and the sold-out flag clears.
    Restock {
        #[arg(long)]
        sku: String,
        #[arg(long)]
        units: u64,
        /// Give the id printed by an earlier attempt to retry it without
        /// adding twice; default: a new one.
        #[arg(long)]
        operation_id: Option<String>,
    },
    /// Close a sale: new requests are rejected (sale_not_active), and so
    /// are the buyers waiting in its line; purchases already reserved
    /// complete or are released.
    Close {
        #[arg(long)]
        sku: String,
    },
}

#[derive(Subcommand)]
enum ReportCommand {
    /// Merge the reports of generators that sent one crowd between them
    /// (`surge --shard i/n`): counts added, latencies from the merged
    /// histograms, the timeline second by second. Exits as a surge would.
    Merge {
        /// The shards' JSON reports.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Also write the merged report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also write it as a self-contained HTML page to this file.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Render a saved report as one self-contained HTML page with its
    /// plots (no network needed to open it).
    Html {
        /// The surge's JSON report.
        report: PathBuf,
        /// Where to write the page.
        #[arg(long, short)]
        out: PathBuf,
        /// An earlier run's JSON report: each figure is shown next to it.
        #[arg(long)]
        compare: Option<PathBuf>,
    },
}

#[derive(Args)]
struct SurgeArgs {
    /// The sku to sell; its sale is created, or reset, first. With
    /// --skus N, the skus are SKU-1 .. SKU-N.
    #[arg(long, default_value = "surge-sku")]
    sku: String,
    /// Units on sale: one number for every sku, or one per sku
    /// (`1000,200,50`).
    #[arg(long, default_value = "500")]
    stock: String,
    /// How many skus are on sale at once, each with its own stock.
    #[arg(long, default_value_t = 1)]
    skus: usize,
    /// How the crowd spreads over the skus: the k-th draws 1/k^S of it
    /// (Zipf; 0: evenly, 1: the first twice the second).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// The skus from a file instead, one per line: `<sku> <stock>
    /// <weight>` (the crowd spread in proportion to the weights).
    #[arg(long, conflicts_with_all = ["skus", "replay"])]
    skus_file: Option<PathBuf>,
    /// Distinct buyers, one purchase of one unit each (default 20000; with
    /// --stages, as many as the stages bring, at most this many).
    #[arg(long)]
    buyers: Option<u64>,
    /// Arrivals per second (open model).
    #[arg(long, conflicts_with_all = ["burst", "stages"])]
    rate: Option<f64>,
    /// Every buyer at once.
    #[arg(long, conflicts_with = "stages")]
    burst: bool,
    /// Arrivals along stages, as k6's ramping-arrival-rate:
    /// `0:2000/s,5s:50000/s,30s:0/s` (the rate moves in a straight line
    /// between stages; two at the same time make a step), or @FILE with
    /// one stage per line.
    #[arg(long)]
    stages: Option<String>,
    /// Send a trace the gateway recorded (FLASHSALE_GATEWAY_RECORD_FILE)
    /// again: each arrival at its offset, with its sku, buyer and quantity.
    /// The trace's skus are put on sale (--stock: one for all, or one each
    /// in the order they first appear).
    #[arg(long, conflicts_with_all = ["rate", "burst", "stages"])]
    replay: Option<PathBuf>,
    /// With --replay, how much faster than recorded to send it.
    #[arg(long, default_value_t = 1.0, requires = "replay")]
    speed: f64,
    /// The sale opens this many seconds after the first buyer is due:
    /// earlier buyers take a place in the line, drawn at the opening.
    #[arg(long, default_value_t = 0.0)]
    opens_in_secs: f64,
    /// A criterion the report must meet, as k6's: `accept_p99_ms<500`,
    /// `oversold==0`, `fairness.inversions<=10` (any figure of the JSON
    /// report by its dotted path, or `<what>_<p50|p99|max>_ms` for a
    /// latency). Repeatable. One that fails exits with 3.
    #[arg(long = "threshold")]
    thresholds: Vec<String>,
    /// Send only this generator's share of the crowd, `i/n` (the buyers
    /// whose index is i modulo n), for a crowd bigger than one machine
    /// sends; the sales must exist (`sale create`), and every shard is
    /// given the same --start-at-unix-ms. `report merge` joins the reports.
    #[arg(long)]
    shard: Option<String>,
    /// When the first buyer is due, in unix milliseconds (default: now).
    #[arg(long)]
    start_at_unix_ms: Option<u64>,
    #[arg(long, default_value_t = 0.1)]
    payment_decline_rate: f64,
    #[arg(long, default_value_t = 20)]
    payment_latency_ms: u64,
    #[arg(long, default_value_t = 1)]
    per_user_limit: u64,
    /// Buyers per unit not yet sold who may hold or wait for one.
    #[arg(long, default_value_t = flashsale_core::stock::DEFAULT_OVERBOOK)]
    overbook: f64,
    /// Concurrent connections to the gateway.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Times a buyer answered 429 or 503 tries again after its Retry-After,
    /// with the same Idempotency-Key (0: every buyer asks once).
    #[arg(long, default_value_t = 3)]
    max_retries: u32,
    /// How long to wait for accepted purchases to settle.
    #[arg(long, default_value_t = 180)]
    settle_timeout_secs: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The share of buyers who retry a 429 or 503 (after its Retry-After,
    /// up to --max-retries times); the others give up at once.
    #[arg(long, default_value_t = 1.0)]
    retry_share: f64,
    /// The share of accepted buyers who then watch their purchase, as a
    /// shop's page would: GET /v1/purchases/{id}?wait= until it ends.
    #[arg(long, default_value_t = 0.0)]
    poll_share: f64,
    /// The share of accepted buyers who then try to buy the same sku again
    /// (a new purchase): the per-user limit at work.
    #[arg(long, default_value_t = 0.0)]
    twice_share: f64,
    /// No progress display while the surge runs.
    #[arg(long)]
    quiet: bool,
    /// Also write the report as one self-contained HTML page with plots.
    #[arg(long)]
    html: Option<PathBuf>,
    /// An earlier run's JSON report, to show each figure of this one next
    /// to it in the HTML page.
    #[arg(long, requires = "html")]
    compare: Option<PathBuf>,
    /// Sign each buyer a bearer token (HS256) with this secret, for a
    /// gateway that verifies them; the gateway's own setting by default.
    #[arg(
        long,
        env = "FLASHSALE_GATEWAY_AUTH_HS256_SECRET",
        hide_env_values = true
    )]
    auth_hs256_secret: Option<String>,
    /// The tokens' `iss`.
    #[arg(
        long,
        env = "FLASHSALE_GATEWAY_AUTH_ISSUER",
        default_value = "flashsale-surge"
    )]
    auth_issuer: String,
    /// The tokens' `aud`.
    #[arg(
        long,
        env = "FLASHSALE_GATEWAY_AUTH_AUDIENCE",
        default_value = "flashsale-gateway"
    )]
    auth_audience: String,
}

/// `flashsale surge`'s exit when the pipeline held (clean audit, every
/// purchase settled) but a `--threshold` did not.
const THRESHOLDS_FAILED: u8 = 3;

fn read_report(path: &std::path::Path) -> anyhow::Result<surge::SurgeReport> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a surge report", path.display()))
}

fn write_html(
    report: &surge::SurgeReport,
    earlier: Option<&surge::SurgeReport>,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let page = flashsale_cli::html::render(report, earlier)?;
    std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))
}

/// Prints a surge's report, saves it as JSON if asked, and exits with its
/// verdict.
fn surge_verdict(
    report: &surge::SurgeReport,
    json: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    print!("{}", report.human());
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if !report.passed() {
        verdict(false)
    } else if !report.thresholds_held() {
        ExitCode::from(THRESHOLDS_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Exit 0 when it holds, 1 when it does not (2 is for errors).
fn verdict(holds: bool) -> ExitCode {
    if holds {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The skus of a surge: `base` alone, or `base-1` .. `base-n`, each with
/// its stock (one for all, or one each) and its Zipf weight.
fn surge_skus(base: &str, stock: &str, n: usize, zipf: f64) -> anyhow::Result<Vec<SkuPlan>> {
    if n == 0 {
        anyhow::bail!("--skus must be 1 or more");
    }
    if !(zipf.is_finite() && zipf >= 0.0) {
        anyhow::bail!("--zipf must be 0 or more");
    }
    let stocks = stocks(stock, n)?;
    surge::zipf(n, zipf)
        .into_iter()
        .zip(stocks)
        .enumerate()
        .map(|(k, (weight, stock))| {
            let name = match n {
                1 => base.to_owned(),
                _ => format!("{base}-{}", k + 1),
            };
            Ok(SkuPlan {
                sku: sku(&name)?,
                stock,
                weight,
            })
        })
        .collect()
}

/// `--stock` for `n` skus: one number for all, or one each.
fn stocks(raw: &str, n: usize) -> anyhow::Result<Vec<u64>> {
    let stocks = raw
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .with_context(|| format!("--stock: {s:?} is not a number of units"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    match stocks.as_slice() {
        [one] => Ok(vec![*one; n]),
        each if each.len() == n => Ok(stocks),
        _ => anyhow::bail!(
            "--stock gives {} numbers for {n} skus: give one for all, or one each",
            stocks.len()
        ),
    }
}

fn sku(raw: &str) -> anyhow::Result<Sku> {
    Sku::parse(raw).with_context(|| format!("--sku {raw:?}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        ops::init_tracing();
    }
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("flashsale: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::from_env(&Env::process())?;
    match cli.command {
        Command::Lag {
            group,
            topic,
            members,
            watch,
            json,
        } => loop {
            let groups = flashsale_cli::lag::read(&config.kafka, &group, &topic, members).await?;
            if json {
                println!("{}", serde_json::to_string(&groups)?);
            } else {
                print!("{}", flashsale_cli::lag::human(&groups));
            }
            if !watch {
                break;
            }
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = tokio::time::sleep(Duration::from_secs(2)) => println!(),
            }
        },
        Command::Setup { check: true } => {
            let findings = flashsale_cli::setup::check(&config).await?;
            for finding in &findings {
                println!("{finding}");
            }
            let differ = findings
                .iter()
                .filter(|f| f.verdict == flashsale_cli::setup::Verdict::Differs)
                .count();
            anyhow::ensure!(
                differ == 0,
                "{differ} thing(s) differ from what the services expect"
            );
        }
        Command::Setup { check: false } => {
            kafka::ensure_topics(&config.kafka).await?;
            Stores::connect(&config).await?;
            println!("topics and tables are in place");
        }
        Command::Sale(SaleCommand::Create {
            sku: raw,
            stock,
            per_user_limit,
            price_cents,
            reservation_ttl_secs,
            start_in_secs,
            duration_secs,
            overbook,
            replace,
        }) => {
            let stores = Stores::connect(&config).await?;
            let spec = SaleSpec {
                sku: sku(&raw)?,
                stock,
                per_user_limit,
                price_cents,
                reservation_ttl: Duration::from_secs(reservation_ttl_secs),
                starts_in: Duration::from_secs(start_in_secs),
                duration: Duration::from_secs(duration_secs),
                overbook,
            };
            let rules = sale::create_unless_open(&stores, &spec, replace).await?;
            println!("{}", serde_json::to_string_pretty(&rules)?);
        }
        Command::Sale(SaleCommand::Show { sku: raw }) => {
            let stores = Stores::connect(&config).await?;
            let sku = sku(&raw)?;
            let Some(view) = sale::show(&stores, &sku).await? else {
                eprintln!("no sale for {sku}");
                return Ok(ExitCode::from(1));
            };
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
        Command::Sale(SaleCommand::Restock {
            sku: raw,
            units,
            operation_id,
        }) => {
            let stores = Stores::connect(&config).await?;
            let sku = sku(&raw)?;
            let operation_id = operation_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            eprintln!("restock operation id: {operation_id}");
            let restocked = sale::restock(&stores, &sku, units, &operation_id).await?;
            println!("{}", serde_json::to_string_pretty(&restocked)?);
        }
        Command::Sale(SaleCommand::Close { sku: raw }) => {
            let stores = Stores::connect(&config).await?;
            let sku = sku(&raw)?;
            sale::close(&stores, &sku).await?;
            println!("{sku}: closed");
        }
        Command::Order(OrderCommand::Show { id }) => {
            let id = flashsale_core::ids::RequestId::parse(&id)?;
            let stores = Stores::connect(&config).await?;
            match flashsale_cli::order::show(&stores, id).await? {
                Some(view) => println!("{}", serde_json::to_string_pretty(&view)?),
                None => {
                    eprintln!("flashsale: no store knows purchase {id}");
                    return Ok(ExitCode::from(1));
                }
            }
        }
        Command::Recover { sku: raws, force } => {
            let stores = Stores::connect(&config).await?;
            let skus = if raws.is_empty() {
                flashsale_cli::recover::lost_skus(&stores).await?
            } else {
                raws.iter().map(|r| sku(r)).collect::<anyhow::Result<_>>()?
            };
            if skus.is_empty() {
                println!("Redis holds every sale: nothing to recover");
            }
            for sku in &skus {
                let recovered = stores.recover(&config, sku, force).await?;
                println!("{}", serde_json::to_string_pretty(&recovered)?);
            }
        }
        Command::Audit {
            sku: raws,
            at_rest,
            json,
        } => {
            let stores = Stores::connect(&config).await?;
            let skus = if raws.is_empty() {
                stores.inventory.skus().await?
            } else {
                raws.iter().map(|r| sku(r)).collect::<anyhow::Result<_>>()?
            };
            let mut reports = Vec::new();
            for sku in &skus {
                let report = stores.audit(sku, at_rest).await?;
                if !json {
                    print!("{}", report.human());
                }
                reports.push(report);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            }
            if skus.is_empty() {
                println!("no sales to audit");
            }
            return Ok(verdict(flashsale_cli::audit::all_clean(&reports)));
        }
        Command::Surge(args) => {
            let args = *args;
            let replay = match &args.replay {
                Some(path) => {
                    if !(args.speed.is_finite() && args.speed > 0.0) {
                        anyhow::bail!("--speed must be a positive number");
                    }
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading the trace {}", path.display()))?;
                    let lines = flashsale_core::arrival_trace::parse(&text)
                        .with_context(|| format!("the trace {}", path.display()))?;
                    anyhow::ensure!(!lines.is_empty(), "the trace {} is empty", path.display());
                    Some(Replay {
                        lines,
                        speed: args.speed,
                    })
                }
                None => None,
            };
            let arrival = match (replay.clone(), args.burst, args.rate, &args.stages) {
                (Some(replay), ..) => Arrival::Replay(replay),
                (None, true, _, _) => Arrival::Burst,
                (None, false, Some(rate), _) if rate > 0.0 && rate.is_finite() => {
                    Arrival::Rate(rate)
                }
                (None, false, Some(rate), _) => {
                    anyhow::bail!("--rate must be a positive number, got {rate}")
                }
                (None, false, None, Some(raw)) => {
                    let raw = match raw.strip_prefix('@') {
                        Some(path) => std::fs::read_to_string(path)
                            .with_context(|| format!("reading the stages in {path}"))?,
                        None => raw.clone(),
                    };
                    Arrival::Stages(Stages::parse(&raw)?)
                }
                (None, false, None, None) => anyhow::bail!(
                    "give --rate R (arrivals per second), --burst or --stages 0:R/s,T:R/s,..."
                ),
            };
            let buyers = match (&arrival, args.buyers) {
                (_, Some(buyers)) => buyers,
                (Arrival::Stages(_) | Arrival::Replay(_), None) => u64::MAX,
                (_, None) => 20_000,
            };
            for (name, share) in [
                ("--retry-share", args.retry_share),
                ("--poll-share", args.poll_share),
                ("--twice-share", args.twice_share),
            ] {
                if !(0.0..=1.0).contains(&share) {
                    anyhow::bail!("{name} must be between 0 and 1");
                }
            }
            if !(args.opens_in_secs.is_finite() && args.opens_in_secs >= 0.0) {
                anyhow::bail!("--opens-in-secs must be 0 or more");
            }
            let known = thresholds::figures(&surge::SurgeReport::default());
            let thresholds = args
                .thresholds
                .iter()
                .map(|raw| Threshold::parse(raw, &known))
                .collect::<Result<Vec<_>, _>>()?;
            if !(0.0..=1.0).contains(&args.payment_decline_rate) {
                anyhow::bail!("--payment-decline-rate must be between 0 and 1");
            }
            let skus = match &replay {
                // The trace's skus, in the order they first appear.
                Some(replay) => {
                    let mut names: Vec<&str> = Vec::new();
                    for line in &replay.lines {
                        if !names.contains(&line.sku.as_str()) {
                            names.push(&line.sku);
                        }
                    }
                    let stocks = stocks(&args.stock, names.len())?;
                    names
                        .iter()
                        .zip(stocks)
                        .map(|(name, stock)| {
                            Ok(SkuPlan {
                                sku: sku(name)?,
                                stock,
                                weight: 1.0,
                            })
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?
                }
                None => match &args.skus_file {
                    Some(path) => {
                        let text = std::fs::read_to_string(path)
                            .with_context(|| format!("reading {}", path.display()))?;
                        SkuPlan::parse_file(&text)
                            .map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))?
                    }
                    None => surge_skus(&args.sku, &args.stock, args.skus, args.zipf)?,
                },
            };
            let stores = Stores::connect(&config).await?;
            let options = SurgeOptions {
                gateway_url: config.gateway_url.clone(),
                skus,
                buyers,
                arrival,
                opens_in: Duration::from_secs_f64(args.opens_in_secs),
                per_user_limit: args.per_user_limit,
                overbook: args.overbook,
                payment_decline_rate: args.payment_decline_rate,
                payment_latency_ms: args.payment_latency_ms,
                connections: args.connections,
                max_retries: args.max_retries,
                settle_timeout: Duration::from_secs(args.settle_timeout_secs),
                tokens: args.auth_hs256_secret.map(|secret| surge::TokenSigner {
                    secret,
                    issuer: args.auth_issuer,
                    audience: args.auth_audience,
                }),
                thresholds,
                shard: args
                    .shard
                    .as_deref()
                    .map(|raw| {
                        surge::Shard::parse(raw)
                            .with_context(|| format!("--shard {raw:?} is not i/n with i below n"))
                    })
                    .transpose()?,
                start_at_unix_ms: args.start_at_unix_ms,
                lag_from: Some(config.kafka.clone()),
                progress: !args.quiet,
                behaviour: surge::Behaviour {
                    retry_share: args.retry_share,
                    poll_share: args.poll_share,
                    twice_share: args.twice_share,
                },
            };
            // Read before the crowd: a wrong path must not waste a surge.
            let earlier = args.compare.as_deref().map(read_report).transpose()?;
            let report = surge::run(&stores, &options).await?;
            if let Some(path) = &args.html {
                write_html(&report, earlier.as_ref(), path)?;
            }
            return surge_verdict(&report, args.json.as_deref());
        }
        Command::Report(ReportCommand::Merge {
            reports,
            json,
            html,
        }) => {
            let reports = reports
                .iter()
                .map(|path| read_report(path))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let merged = flashsale_cli::merge::merge(&reports)?;
            if let Some(path) = &html {
                write_html(&merged, None, path)?;
            }
            return surge_verdict(&merged, json.as_deref());
        }
        Command::Report(ReportCommand::Html {
            report,
            out,
            compare,
        }) => {
            let report = read_report(&report)?;
            let earlier = compare.as_deref().map(read_report).transpose()?;
            write_html(&report, earlier.as_ref(), &out)?;
            println!("wrote {}", out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
