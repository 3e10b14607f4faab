#[tokio::main]
async fn main() -> anyhow::Result<()> {
    product_service::run().await
}
