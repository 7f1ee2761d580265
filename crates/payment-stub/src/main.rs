use anyhow::Context;
use flashsale_core::service::ops;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ops::service_main(
        "payment-stub",
        include_str!("../help.txt"),
        flashsale_payment_stub::Config::from_env,
        |config, shutdown| async move {
            let started = flashsale_payment_stub::start(config, shutdown)
                .await
                .context("starting the payment-stub")?;
            Ok(started.task.await??)
        },
    )
    .await
}
