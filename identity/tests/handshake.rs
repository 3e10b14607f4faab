//! Real TLS 1.3 handshakes over loopback between credentials the issuer
//! made: who is accepted and who is refused.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_identity::{
    Credentials, Issuer, KeyPair, SpiffeId, TrustBundle, request::new_key_and_request, tls,
};

const HOUR: Duration = Duration::from_secs(3600);

fn root() -> Issuer {
    Issuer::new_root("cluster.local", 24 * HOUR).unwrap()
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa)
}

fn workload(issuer: &Issuer, bundle: &TrustBundle, sa: &str) -> Credentials {
    let (key, csr) = new_key_and_request(&id(sa)).unwrap();
    let issued = issuer.certify_request(&csr, &id(sa), HOUR).unwrap();
    Credentials::new(&issued.chain_pem, &key, bundle.clone()).unwrap()
}

fn bundle_of(issuers: &[&Issuer]) -> TrustBundle {
    let pem: String = issuers.iter().map(|i| i.cert_pem()).collect();
    TrustBundle::from_pem(&pem).unwrap()
}

/// Runs one handshake and a ping; returns the client's view (Ok when the
/// server answered) and the identity the server saw.
async fn handshake(
    server: &Credentials,
    client: &Credentials,
    expected_server: SpiffeId,
) -> (Result<(), String>, Option<SpiffeId>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.server_config().unwrap());
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.ok()?;
        let peer = tls::peer_id(tls.get_ref().1.peer_certificates().unwrap_or_default());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.ok()?;
        tls.write_all(b"pong").await.ok()?;
        tls.shutdown().await.ok()?;
        peer
    });
    let connector = TlsConnector::from(Arc::new(
        client
            .client_config(expected_server, &[tls::ALPN_H2])
            .unwrap(),
    ));
    let result = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("order.shop.svc.cluster.local").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(tls::ALPN_H2));
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(())
    }
    .await;
    let seen = server_task.await.unwrap();
    (result, seen)
}

#[tokio::test]
async fn two_workloads_of_one_root_authenticate_each_other() {
    let ca = root();
    let bundle = bundle_of(&[&ca]);
    let server = workload(&ca, &bundle, "user");
    let client = workload(&ca, &bundle, "order");
    let (result, seen) = handshake(&server, &client, id("user")).await;
    assert_eq!(result, Ok(()));
    assert_eq!(seen, Some(id("order")));
}

#[tokio::test]
async fn a_server_with_another_service_accounts_certificate_is_refused() {
    let ca = root();
    let bundle = bundle_of(&[&ca]);
    let impostor = workload(&ca, &bundle, "product");
    let client = workload(&ca, &bundle, "order");
    let (result, seen) = handshake(&impostor, &client, id("user")).await;
    let err = result.unwrap_err();
    assert!(
        err.contains("spiffe://cluster.local/ns/shop/sa/product")
            && err.contains("spiffe://cluster.local/ns/shop/sa/user"),
        "{err}"
    );
    assert_eq!(seen, None);
}

#[tokio::test]
async fn a_certificate_from_another_root_is_refused_both_ways() {
    let ours = root();
    let theirs = root();
    let bundle = bundle_of(&[&ours]);
    let stranger = workload(&theirs, &bundle_of(&[&theirs]), "user").with_bundle(bundle.clone());
    let client = workload(&ours, &bundle, "order");
    // A server from another root.
    let (result, _) = handshake(&stranger, &client, id("user")).await;
    let err = result.unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");
    // A client from another root.
    let server = workload(&ours, &bundle, "user");
    let stranger_client = workload(&theirs, &bundle_of(&[&theirs]), "order").with_bundle(bundle);
    let (result, seen) = handshake(&server, &stranger_client, id("user")).await;
    assert!(result.is_err(), "a client of another root was served");
    assert_eq!(seen, None);
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let ca = root();
    let bundle = bundle_of(&[&ca]);
    let key = KeyPair::generate().unwrap();
    let expired = ca
        .certify(
            &key,
            Some(&id("user")),
            &[],
            SystemTime::now() - 2 * HOUR,
            HOUR,
        )
        .unwrap();
    // A sidecar never takes one into use...
    let err = Credentials::new(&expired.chain_pem, &key, bundle.clone()).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    // ...and a client refuses a server that presents one.
    let server = ExpiredServer::serve(&ca, &expired.chain_pem, &key).await;
    let client = workload(&ca, &bundle, "order");
    let connector = TlsConnector::from(Arc::new(
        client.client_config(id("user"), &[tls::ALPN_H2]).unwrap(),
    ));
    let tcp = TcpStream::connect(server).await.unwrap();
    let err = connector
        .connect(ServerName::try_from("user").unwrap(), tcp)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}

/// A TLS server presenting a chain as given, whatever its validity,
/// trusting `ca` for clients.
struct ExpiredServer;

impl ExpiredServer {
    async fn serve(ca: &Issuer, chain_pem: &str, key: &KeyPair) -> std::net::SocketAddr {
        let chain = trellis_identity::pem::certificates(chain_pem).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    tls::provider(),
                )
                .build()
                .unwrap(),
            )
            .with_single_cert(
                chain,
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        addr
    }
}

#[tokio::test]
async fn an_overlapping_bundle_accepts_certificates_of_both_roots() {
    let old = root();
    let new = root();
    let both = bundle_of(&[&old, &new]);
    let server = workload(&old, &both, "user");
    let client = workload(&new, &both, "order");
    let (result, seen) = handshake(&server, &client, id("user")).await;
    assert_eq!(result, Ok(()));
    assert_eq!(seen, Some(id("order")));
}
