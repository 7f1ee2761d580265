use anyhow::Context;
use flashsale_core::service::ops;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ops::service_main(
        "shop-worker",
        include_str!("../help.txt"),
        flashsale_shop_worker::Config::from_env,
        |config, shutdown| async move {
            let started = flashsale_shop_worker::start(config, shutdown)
                .await
                .context("starting the shop-worker")?;
            Ok(started.task.await??)
        },
    )
    .await
}
