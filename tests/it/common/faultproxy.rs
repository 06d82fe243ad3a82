//! A fault-injecting proxy (on loopback unless told otherwise), put between the daemon and a server it talks to (a
//! pricing feed, S3, Swift, a viaduct receiver). Faults are drawn from a seeded RNG at
//! configurable rates and counted, so a test can print what it injected and check the
//! faults really happened.
//!
//! Two layers. The TCP layer draws per connection: a reset (`SO_LINGER` 0, so the peer sees
//! an RST) after a random number of bytes, or a stall (the bytes stop flowing for longer
//! than the client waits, then the connection closes). For HTTP upstreams an HTTP layer
//! behind it draws per request: an answer of its own (`503` or `429` with `Retry-After`, or
//! `500`) instead of forwarding, or the upstream's answer with its body cut short (the
//! headers promise the whole length, the connection closes part way).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How often each fault is injected: per connection for resets and stalls, per request for
/// the others (HTTP only).
#[derive(Clone, Copy, Debug, Default)]
pub struct Rates {
    pub reset: f64,
    pub stall: f64,
    /// `503`, `500` or `429` answered by the proxy.
    pub error: f64,
    pub truncate: f64,
}

impl Rates {
    /// `rate` spread evenly over the faults that apply: all four for HTTP, resets and
    /// stalls for a plain TCP upstream.
    pub fn spread(rate: f64, http: bool) -> Rates {
        if http {
            let r = rate / 4.0;
            Rates {
                reset: r,
                stall: r,
                error: r,
                truncate: r,
            }
        } else {
            Rates {
                reset: rate / 2.0,
                stall: rate / 2.0,
                ..Rates::default()
            }
        }
    }

    pub fn none() -> Rates {
        Rates::default()
    }
}

/// What a proxy injected, and what it let through.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub connections: u64,
    pub requests: u64,
    pub resets: u64,
    pub stalls: u64,
    pub answered_503: u64,
    pub answered_500: u64,
    pub answered_429: u64,
    pub truncated: u64,
}

impl Counts {
    pub fn faults(&self) -> u64 {
        self.resets
            + self.stalls
            + self.answered_503
            + self.answered_500
            + self.answered_429
            + self.truncated
    }

    pub fn add(&mut self, o: &Counts) {
        self.connections += o.connections;
        self.requests += o.requests;
        self.resets += o.resets;
        self.stalls += o.stalls;
        self.answered_503 += o.answered_503;
        self.answered_500 += o.answered_500;
        self.answered_429 += o.answered_429;
        self.truncated += o.truncated;
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections, {} requests; injected {} resets, {} stalls, {} × 503, {} × 500, \
             {} × 429, {} truncated bodies",
            self.connections,
            self.requests,
            self.resets,
            self.stalls,
            self.answered_503,
            self.answered_500,
            self.answered_429,
            self.truncated
        )
    }
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    resets: AtomicU64,
    stalls: AtomicU64,
    answered_503: AtomicU64,
    answered_500: AtomicU64,
    answered_429: AtomicU64,
    truncated: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Shared {
    rates: Mutex<Rates>,
    rng: Mutex<fastrand::Rng>,
    counters: Counters,
    /// How long a stalled connection holds before it closes.
    stall: Duration,
    /// A connection's fault strikes within its first 64 KiB, drawn evenly; or, when set,
    /// within its first this many bytes, drawn log-uniformly (see
    /// [`FaultProxy::set_strike_spread`]).
    strike_spread: AtomicU64,
    /// When a request was last answered by the upstream in full, by path.
    clean: Mutex<HashMap<String, Vec<Instant>>>,
    /// Faults set for particular requests, taken in order, before any drawn fault.
    scripted: Mutex<Vec<Scripted>>,
}

/// What a scripted fault does to the request it matches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lost {
    /// The request never reaches the upstream: the proxy answers `503` itself.
    Request,
    /// The upstream gets the request and acts on it, and its answer is replaced by a `503`:
    /// the client cannot tell that it happened.
    Answer,
}

/// `count` requests with `method` whose path starts with `path` get `lost`.
struct Scripted {
    method: String,
    path: String,
    lost: Lost,
    count: u64,
}

impl Shared {
    /// The scripted fault the request `method path` takes, if one matches.
    fn scripted_fault(&self, method: &str, path: &str) -> Option<Lost> {
        let mut scripted = self.scripted.lock().unwrap();
        let f = scripted
            .iter_mut()
            .find(|f| f.count > 0 && f.method == method && path.starts_with(&f.path))?;
        f.count -= 1;
        Some(f.lost)
    }

    fn rates(&self) -> Rates {
        *self.rates.lock().unwrap()
    }

    fn f64(&self) -> f64 {
        self.rng.lock().unwrap().f64()
    }

    fn below(&self, n: u64) -> u64 {
        self.rng.lock().unwrap().u64(..n.max(1))
    }
}

pub struct FaultProxy {
    /// `127.0.0.1:PORT`, where clients connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _rt: tokio::runtime::Runtime,
}

impl FaultProxy {
    /// A proxy for the plain TCP server at `upstream`: resets and stalls only.
    pub fn tcp(upstream: SocketAddr, rates: Rates, seed: u64, stall: Duration) -> FaultProxy {
        FaultProxy::tcp_on(Ipv4Addr::LOCALHOST.into(), upstream, rates, seed, stall)
    }

    /// [`FaultProxy::tcp`] listening on `bind` instead of loopback (the bridge's address, for
    /// clients in other network namespaces).
    pub fn tcp_on(
        bind: IpAddr,
        upstream: SocketAddr,
        rates: Rates,
        seed: u64,
        stall: Duration,
    ) -> FaultProxy {
        FaultProxy::start(bind, upstream, rates, seed, stall, false)
    }

    /// A proxy for the HTTP server at `upstream` (`http://HOST:PORT[/…]`; the path is
    /// ignored). Headers naming the upstream (Swift's `X-Storage-Url`, `Location`) are
    /// rewritten to name the proxy, so that clients keep coming through it.
    pub fn http(upstream: &str, rates: Rates, seed: u64, stall: Duration) -> FaultProxy {
        let authority = upstream
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap();
        let addr: SocketAddr = authority
            .parse()
            .unwrap_or_else(|e| panic!("{upstream}: not http://IP:PORT: {e}"));
        FaultProxy::start(Ipv4Addr::LOCALHOST.into(), addr, rates, seed, stall, true)
    }

    fn start(
        bind: IpAddr,
        upstream: SocketAddr,
        rates: Rates,
        seed: u64,
        stall: Duration,
        http: bool,
    ) -> FaultProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("faultproxy")
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Shared {
            rates: Mutex::new(rates),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            counters: Counters::default(),
            stall,
            strike_spread: AtomicU64::new(0),
            clean: Mutex::default(),
            scripted: Mutex::default(),
        });
        let outer = rt.block_on(TcpListener::bind((bind, 0))).unwrap();
        let addr = outer.local_addr().unwrap();
        // The HTTP layer listens on a port of its own; the TCP layer forwards to it.
        let next_hop = if http {
            let inner = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
            let inner_addr = inner.local_addr().unwrap();
            let state = HttpLayer {
                shared: shared.clone(),
                upstream,
                public: addr,
                client: reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .no_proxy()
                    .build()
                    .unwrap(),
            };
            let app = axum::Router::new().fallback(move |req: Request| {
                let state = state.clone();
                async move { state.handle(req).await }
            });
            rt.spawn(async move {
                let _ = axum::serve(inner, app).await;
            });
            inner_addr
        } else {
            upstream
        };
        let s = shared.clone();
        rt.spawn(async move {
            while let Ok((client, _)) = outer.accept().await {
                let s = s.clone();
                tokio::spawn(async move { tcp_connection(&s, client, next_hop).await });
            }
        });
        FaultProxy {
            addr,
            shared,
            _rt: rt,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `url` with its authority replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let rest = url.trim_start_matches("http://");
        let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("");
        format!("{}{path}", self.base())
    }

    pub fn set_rates(&self, rates: Rates) {
        *self.shared.rates.lock().unwrap() = rates;
    }

    /// Lets a connection's fault strike at a byte drawn log-uniformly up to `bytes`: as
    /// often in the handshakes and the first exchanges as in the middle of a long copy.
    pub fn set_strike_spread(&self, bytes: u64) {
        self.shared
            .strike_spread
            .store(bytes.max(2), Ordering::Relaxed);
    }

    pub fn counts(&self) -> Counts {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            connections: get(&c.connections),
            requests: get(&c.requests),
            resets: get(&c.resets),
            stalls: get(&c.stalls),
            answered_503: get(&c.answered_503),
            answered_500: get(&c.answered_500),
            answered_429: get(&c.answered_429),
            truncated: get(&c.truncated),
        }
    }

    /// The next `count` requests with `method` whose path starts with `path` fail the way
    /// `lost` says, whatever the rates (HTTP only). They count as `503` answers.
    pub fn fail_next(&self, method: &str, path: &str, lost: Lost, count: u64) {
        self.shared.scripted.lock().unwrap().push(Scripted {
            method: method.to_string(),
            path: path.to_string(),
            lost,
            count,
        });
    }

    /// How many of the requests set by [`FaultProxy::fail_next`] have not come yet.
    pub fn scripted_left(&self) -> u64 {
        self.shared
            .scripted
            .lock()
            .unwrap()
            .iter()
            .map(|f| f.count)
            .sum()
    }

    /// When requests for `path` were answered by the upstream in full (HTTP only).
    pub fn clean_answers(&self, path: &str) -> Vec<Instant> {
        self.shared
            .clean
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

#[derive(Clone, Copy)]
enum ConnFault {
    Reset,
    Stall,
}

/// Forwards one connection both ways; a drawn fault strikes after a random number of bytes
/// (up to 64 KiB), so that it lands in requests, answers and bodies alike.
async fn tcp_connection(s: &Shared, client: TcpStream, next_hop: SocketAddr) {
    bump(&s.counters.connections);
    let rates = s.rates();
    let draw = s.f64();
    let fault = if draw < rates.reset {
        Some(ConnFault::Reset)
    } else if draw < rates.reset + rates.stall {
        Some(ConnFault::Stall)
    } else {
        None
    };
    let strike_at = match s.strike_spread.load(Ordering::Relaxed) {
        0 => s.below(64 << 10),
        spread => (spread as f64).powf(s.f64()) as u64,
    };
    let Ok(upstream) = TcpStream::connect(next_hop).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if matches!(fault, Some(ConnFault::Reset)) {
        let _ = client.set_zero_linger();
    }
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let (mut up_buf, mut down_buf) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    let (mut up_open, mut down_open) = (true, true);
    let mut moved: u64 = 0;
    while up_open || down_open {
        // Reads at most up to the strike, so the fault lands at its byte.
        let room = match fault {
            Some(_) => (strike_at.saturating_sub(moved) as usize).clamp(1, 16 << 10),
            None => 16 << 10,
        };
        tokio::select! {
            n = cr.read(&mut up_buf[..room]), if up_open => match n {
                Ok(0) | Err(_) => {
                    up_open = false;
                    let _ = uw.shutdown().await;
                }
                Ok(n) => {
                    if uw.write_all(&up_buf[..n]).await.is_err() {
                        break;
                    }
                    moved += n as u64;
                }
            },
            n = ur.read(&mut down_buf[..room]), if down_open => match n {
                Ok(0) | Err(_) => {
                    down_open = false;
                    let _ = cw.shutdown().await;
                }
                Ok(n) => {
                    if cw.write_all(&down_buf[..n]).await.is_err() {
                        break;
                    }
                    moved += n as u64;
                }
            },
        }
        if fault.is_some() && moved >= strike_at {
            break;
        }
    }
    match fault {
        Some(ConnFault::Reset) if moved >= strike_at => {
            bump(&s.counters.resets);
            // Dropping both halves closes the client's socket with SO_LINGER 0: an RST.
        }
        Some(ConnFault::Stall) if moved >= strike_at => {
            bump(&s.counters.stalls);
            tokio::time::sleep(s.stall).await;
        }
        _ => {}
    }
}

/// A `503` from the proxy, with `Retry-After` as the drawn ones carry.
fn unavailable() -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        "fault injected by the test proxy\n",
    )
        .into_response();
    r.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    r.headers_mut()
        .insert("connection", HeaderValue::from_static("close"));
    r
}

#[derive(Clone)]
struct HttpLayer {
    shared: Arc<Shared>,
    upstream: SocketAddr,
    /// The address clients use: what upstream addresses in headers become.
    public: SocketAddr,
    client: reqwest::Client,
}

/// Headers that belong to one hop, not to the request or answer.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for h in HOP_BY_HOP {
        out.remove(*h);
    }
    out
}

impl HttpLayer {
    async fn handle(&self, req: Request) -> Response {
        let s = &self.shared;
        bump(&s.counters.requests);
        let scripted = s.scripted_fault(req.method().as_str(), req.uri().path());
        if scripted == Some(Lost::Request) {
            bump(&s.counters.answered_503);
            return unavailable();
        }
        let rates = match scripted {
            Some(_) => Rates::none(),
            None => s.rates(),
        };
        let draw = s.f64();
        if draw < rates.error {
            let (status, counter) = match s.below(3) {
                0 => (StatusCode::SERVICE_UNAVAILABLE, &s.counters.answered_503),
                1 => (StatusCode::INTERNAL_SERVER_ERROR, &s.counters.answered_500),
                _ => (StatusCode::TOO_MANY_REQUESTS, &s.counters.answered_429),
            };
            bump(counter);
            let mut r = (status, "fault injected by the test proxy\n").into_response();
            if status != StatusCode::INTERNAL_SERVER_ERROR {
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("1"));
            }
            // The request's body is not read: the connection cannot be reused.
            r.headers_mut()
                .insert("connection", HeaderValue::from_static("close"));
            return r;
        }
        let truncate = draw < rates.error + rates.truncate;

        let path = req.uri().path().to_string();
        let path_and_query = req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into());
        let url = format!("http://{}{path_and_query}", self.upstream);
        let (parts, body) = req.into_parts();
        // A request without a framed body (a DELETE, a HEAD) goes without one: a streamed
        // body would go chunked, which S3 servers refuse without a `Content-Length`.
        let framed = parts.headers.contains_key("content-length")
            || parts.headers.contains_key("transfer-encoding");
        let body = if framed {
            reqwest::Body::wrap_stream(body.into_data_stream())
        } else {
            reqwest::Body::from(Vec::new())
        };
        // `Host` goes as the client sent it: S3 signatures cover it.
        let sent = self
            .client
            .request(parts.method, url)
            .headers(end_to_end(&parts.headers))
            .body(body)
            .send()
            .await;
        let answer = match sent {
            Ok(a) => a,
            Err(e) => {
                return (
                    StatusCode::BAD_GATEWAY,
                    format!("the test proxy could not reach the upstream: {e}\n"),
                )
                    .into_response()
            }
        };
        if scripted == Some(Lost::Answer) {
            // The upstream has acted; what it answered is read and dropped.
            let _ = answer.bytes().await;
            bump(&s.counters.answered_503);
            return unavailable();
        }
        let status = answer.status();
        let mut headers = end_to_end(answer.headers());
        let (from, to) = (self.upstream.to_string(), self.public.to_string());
        for value in headers.values_mut() {
            if let Ok(text) = value.to_str() {
                if text.contains(&from) {
                    *value = HeaderValue::from_str(&text.replace(&from, &to)).unwrap();
                }
            }
        }
        let length: Option<u64> = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = match length {
            Some(len) if truncate && len > 0 => {
                bump(&s.counters.truncated);
                let mut left = s.below(len);
                let stream = answer.bytes_stream();
                let cut = stream
                    .map(move |chunk| {
                        let mut chunk = chunk.map_err(std::io::Error::other)?;
                        if chunk.len() as u64 >= left {
                            chunk.truncate(left as usize);
                            left = 0;
                        } else {
                            left -= chunk.len() as u64;
                        }
                        Ok::<_, std::io::Error>(chunk)
                    })
                    .take_while(|c| {
                        let more = c.as_ref().map(|b| !b.is_empty()).unwrap_or(true);
                        std::future::ready(more)
                    })
                    .chain(futures_util::stream::once(async {
                        Err(std::io::Error::other("body cut short by the test proxy"))
                    }));
                Body::from_stream(cut)
            }
            _ => {
                // Noted when the upstream answers: a body of known length is not polled past
                // its end, so its end cannot be noted.
                s.clean
                    .lock()
                    .unwrap()
                    .entry(path)
                    .or_default()
                    .push(Instant::now());
                Body::from_stream(answer.bytes_stream())
            }
        };
        let mut r = Response::new(body);
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        r
    }
}
