use anyhow::Context;
use flashsale_core::service::ops;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ops::service_main(
        "order-worker",
        include_str!("../help.txt"),
        flashsale_order_worker::Config::from_env,
        |config, shutdown| async move {
            let started = flashsale_order_worker::start(config, shutdown)
                .await
                .context("starting the order-worker")?;
            Ok(started.task.await??)
        },
    )
    .await
}
