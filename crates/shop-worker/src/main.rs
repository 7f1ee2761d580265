use anyhow::Context;
use flashsale_core::{ops, settings::Env};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{}", include_str!("../help.txt"));
        return Ok(());
    }
    ops::init_tracing();
    let config = flashsale_shop_worker::Config::from_env(&Env::process())?;
    tracing::info!(?config, "starting shop-worker");
    let shutdown = ops::shutdown_on_signal();
    let worker = flashsale_shop_worker::start(config, shutdown)
        .await
        .context("starting the shop-worker")?;
    worker.task.await?;
    Ok(())
}
