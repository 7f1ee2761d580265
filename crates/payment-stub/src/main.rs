use anyhow::Context;
use flashsale_core::{ops, settings::Env};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{}", include_str!("../help.txt"));
        return Ok(());
    }
    ops::init_tracing();
    let config = flashsale_payment_stub::Config::from_env(&Env::process())?;
    tracing::info!(?config, "starting payment-stub");
    let shutdown = ops::shutdown_on_signal();
    let stub = flashsale_payment_stub::start(config, shutdown)
        .await
        .context("starting the payment stub")?;
    stub.task.await??;
    Ok(())
}
