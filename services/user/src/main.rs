#[tokio::main]
async fn main() -> anyhow::Result<()> {
    user_service::run().await
}
