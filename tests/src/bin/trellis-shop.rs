//! The demo's scenario, run by `cargo xtask demo` once the cluster, the images
//! and PostgreSQL are there: installs the chart, deploys examples/shop into
//! `shop`, places orders, takes the product service out and watches the
//! breaker open and close, changes a policy live, and prints what the
//! MicroServices and the sidecars say. The steps are those of the end-to-end
//! suite (tests/tests/shop.rs), from the same module (`trellis_tests::shop`).
//!
//! Usage: `trellis-shop` (environment as for the suite: KUBECONFIG, TRELLIS_E2E_*).

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::json;
use trellis_tests::{
    issuer::{self, Issuer},
    kubectl,
    shop::{
        self, SERVICES, Shop, Target, burst, by_status, latency_quantile, service_delta,
        wait_policy_applied,
    },
    shop_metrics::REQUESTS,
};

/// The namespace of examples/shop.
const NAMESPACE: &str = "shop";
/// The chart's release and namespace, as the README installs it.
const RELEASE: &str = "trellis";
const SYSTEM: &str = "trellis-system";
/// The window of the closing `trellis stat`, in seconds.
const STAT_SECONDS: u64 = 10;

fn say(text: &str) {
    println!("\n▶ {text}");
}

fn detail(text: &str) {
    println!("  {text}");
}

#[tokio::main]
async fn main() -> ExitCode {
    match demo().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<()> {
    let target = Target::from_env()?;

    say("Installing the Trellis operator with Helm (charts/trellis), watching namespace shop");
    let started = Instant::now();
    // First the namespace: a namespaced install puts the operator's Role in it.
    shop::run(
        kubectl()
            .arg("apply")
            .arg("-f")
            .arg(shop::workspace().join("examples/shop/namespace.yaml")),
    )?;
    shop::install_chart(RELEASE, SYSTEM, NAMESPACE)?;
    detail(&format!(
        "helm upgrade --install {RELEASE} charts/trellis -n {SYSTEM} --set watchNamespace={NAMESPACE}: operator available in {:.0?}",
        started.elapsed()
    ));

    say("The shop's login issuer: a key pair made now, its public keys in Secret shop-issuer-keys");
    let issuer = Issuer::new();
    issuer.store(NAMESPACE, shop::ISSUER_SECRET)?;
    detail(&format!(
        "orders need a token it signs (issuer {}, audience {}); examples/shop/gateway.yaml's EdgePolicy checks them at the gateway",
        issuer::ISSUER,
        issuer::AUDIENCE
    ));

    say("Deploying the shop: kubectl apply -f examples/shop/");
    let out = shop::run(
        kubectl()
            .arg("apply")
            .arg("-f")
            .arg(shop::workspace().join("examples/shop")),
    )?;
    for line in out.lines() {
        detail(line);
    }
    let started = Instant::now();
    shop::wait_ready(NAMESPACE, Duration::from_secs(300))
        .context("waiting for the shop's MicroServices to be Ready")?;
    detail(&format!(
        "kubectl wait --for=condition=Ready microservice --all -n {NAMESPACE}: Ready in {:.0?}",
        started.elapsed()
    ));

    let client = trellis_tests::client().await;
    say("The shop's edge: a Gateway (examples/shop/gateway.yaml) run by the operator");
    let started = Instant::now();
    let mut shop = Shop::new(client, NAMESPACE, &target)
        .await
        .signed_in(issuer)
        .through_gateway(shop::GATEWAY)
        .await?;
    if let Some(edge) = shop.reach.edge() {
        detail(&format!(
            "kubectl get gateway {} -n {NAMESPACE}: Programmed at {} in {:.0?}; the orders below go through it",
            shop::GATEWAY,
            edge.address,
            started.elapsed()
        ));
    }

    say(
        "Placing orders: order checks the user over gRPC and reserves stock over REST, through its sidecar",
    );
    shop.seed(3, 3).await?;
    detail(&format!(
        "created users {:?} and products {:?} through the gateway's routes to the user and product Services",
        shop.users, shop.products
    ));
    let (alice, bob, product) = (shop.users[0], shop.users[1], shop.products[0]);
    let anonymous = shop.order_as(None, alice, product).await?;
    detail(&format!(
        "an order without a token: {} from the gateway ({})",
        anonymous.status,
        anonymous
            .header("www-authenticate")
            .unwrap_or("no challenge")
    ));
    anyhow::ensure!(
        anonymous.status == 401,
        "the gateway should refuse an order without a token with 401; see `kubectl describe edgepolicy shop-orders-login -n {NAMESPACE}`"
    );
    let token = shop.issuer.as_ref().map(|i| i.token(&alice.to_string()));
    let impostor = shop.order_as(token.as_deref(), bob, product).await?;
    detail(&format!(
        "user {alice}'s token placing an order for user {bob}: {} from the order service, which reads the signed-in user from x-user-id, set by the gateway from the token: {}",
        impostor.status,
        impostor.body.trim()
    ));
    anyhow::ensure!(
        impostor.status == 403,
        "the order service should refuse another user's order with 403; see `kubectl logs -n {NAMESPACE} deploy/order`"
    );
    let before = shop.scrape(&SERVICES).await?;
    let outcomes = shop.orders(40, 2).await;
    let after = shop.scrape(&SERVICES).await?;
    detail(&format!(
        "40 orders placed: {}",
        statuses(&by_status(&outcomes))
    ));
    if let Some(o) = outcomes.iter().find(|o| o.status == 201) {
        detail(&format!("one of them: {}", o.body.trim()));
    }
    let orders = service_delta(&before, &after, "order");
    let count = |dep: &str| {
        orders.sum(
            REQUESTS,
            &[
                ("direction", "outbound"),
                ("service", dep),
                ("status_class", "2xx"),
            ],
        )
    };
    detail(&format!(
        "the order sidecars sent {} calls to user (gRPC ValidateUser) and {} to product (REST reserve)",
        count(&shop.qualified("user")),
        count(&shop.qualified("product"))
    ));

    say("A product outage: every product pod deleted while orders keep coming (40/s)");
    let outage = shop::product_outage(&shop, 40.0, Duration::from_secs(90)).await?;
    let at = |t: Option<Duration>| {
        t.map_or("never".to_owned(), |t| {
            format!("{:.1}s", t.saturating_sub(outage.deleted_at).as_secs_f64())
        })
    };
    detail(&format!("deleted {}", outage.deleted.join(", ")));
    detail(&format!(
        "orders during the outage: {}",
        statuses(&by_status(
            &outage.during().into_iter().cloned().collect::<Vec<_>>()
        ))
    ));
    detail(&format!(
        "the order sidecars' breaker for product opened at +{}",
        at(outage.opened_at)
    ));
    let refused = outage.breaker_refusals();
    if let Some(first) = refused.first() {
        detail(&format!(
            "{} orders failed fast while it was open (p50 {:.1?}, p99 {:.1?}), each answered {}: {}",
            refused.len(),
            latency_quantile(&refused, 0.5).unwrap_or_default(),
            latency_quantile(&refused, 0.99).unwrap_or_default(),
            first.status,
            first.body.trim()
        ));
    }
    detail(&format!(
        "new product pods came up; the breaker let probes through and closed at +{}",
        at(outage.closed_at)
    ));
    detail(&format!(
        "orders succeeded again from +{}",
        at(outage.recovered_at)
    ));
    shop::wait_ready(NAMESPACE, Duration::from_secs(120))?;

    say(
        "A live policy change: kubectl patch microservice product with an inbound rate limit of 2/s",
    );
    let uids = shop.pod_uids("product").await?;
    let generations = shop.policy_generations("product").await?;
    shop::patch_microservice(
        NAMESPACE,
        "product",
        &json!({ "spec": { "inbound": { "rateLimit": { "perSecond": 2, "burst": 2 } } } }),
    )?;
    let generations =
        wait_policy_applied(&shop, "product", &generations, Duration::from_secs(60)).await?;
    let path = format!("/api/v1/products/{}", shop.products[0]);
    let replies = burst(&shop.reach, "product", &path, 30).await?;
    let limited: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    detail(&format!(
        "every product sidecar applied it (policy generation {:?}); 30 quick GETs: {} answered 429",
        generations.values().collect::<Vec<_>>(),
        limited.len()
    ));
    if let Some(r) = limited.first() {
        detail(&format!(
            "Retry-After: {}, body: {}",
            r.header("retry-after").unwrap_or("-"),
            r.body.trim()
        ));
    }
    let same = shop.pod_uids("product").await? == uids;
    detail(&format!(
        "pods restarted: {}",
        if same {
            "none (same pod uids)"
        } else {
            "yes?!"
        }
    ));
    shop::patch_microservice(
        NAMESPACE,
        "product",
        &json!({ "spec": { "inbound": null } }),
    )?;
    wait_policy_applied(&shop, "product", &generations, Duration::from_secs(60)).await?;
    detail("the limit removed again, live as well");

    say("kubectl get microservices -n shop");
    print!(
        "{}",
        shop::run(kubectl().args(["get", "microservices", "-n", NAMESPACE]))?
    );
    say("kubectl describe microservice order -n shop");
    print!(
        "{}",
        shop::run(kubectl().args(["describe", "microservice", "order", "-n", NAMESPACE]))?
    );

    say(&format!(
        "trellis stat -n shop: what the sidecars measure, over {STAT_SECONDS} s of orders at 20/s"
    ));
    let load = shop.load(20.0, 4);
    // The first orders of a burst open connections: stat starts after them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stat = trellis_cli::stat::Options {
        microservice: None,
        namespace: Some(NAMESPACE.to_owned()),
        all_namespaces: false,
        interval: STAT_SECONDS,
        watch: false,
        output: "table".to_owned(),
    };
    let rows = trellis_cli::stat::rows(&trellis_tests::client().await, &stat).await;
    let outcomes = load.stop().await;
    print!("{}", trellis_cli::stat::table(&rows?));
    let answered: Vec<_> = outcomes.iter().collect();
    detail(&format!(
        "the load generator, for comparison: {} orders in {:.0?} ({}), p50 {:.1?}, p99 {:.1?}",
        outcomes.len(),
        outcomes
            .last()
            .map(|o| o.at + o.elapsed)
            .unwrap_or_default(),
        statuses(&by_status(&outcomes)),
        latency_quantile(&answered, 0.5).unwrap_or_default(),
        latency_quantile(&answered, 0.99).unwrap_or_default(),
    ));
    detail("again, on a shop you use: trellis stat -n shop --watch");
    Ok(())
}

fn statuses(counts: &[(u16, usize)]) -> String {
    counts
        .iter()
        .map(|(s, n)| {
            if *s == 0 {
                format!("{n} without an answer")
            } else {
                format!("{n} × {s}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
