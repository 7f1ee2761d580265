use anyhow::Context;
use flashsale_core::service::ops;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ops::service_main(
        "gateway",
        include_str!("../help.txt"),
        flashsale_gateway::Config::from_env,
        |config, shutdown| async move {
            let started = flashsale_gateway::start(config, shutdown)
                .await
                .context("starting the gateway")?;
            Ok(started.task.await??)
        },
    )
    .await
}
