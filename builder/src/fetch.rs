//! The download cache of a fleet upgrade: a caching HTTP forward proxy on 127.0.0.1 that
//! fetches each URL from upstream once per run and serves the same bytes to every guest.
//!
//! Each guest runs its own `apt-get update` and `apt-get dist-upgrade`, inside the guest and
//! with the guest's own keyrings, pointed at this proxy by
//! `-o Acquire::http::Proxy=`[`DownloadCache::proxy_url`]. So every package index and package
//! file is downloaded once for the whole fleet, all guests see one snapshot of the archive
//! during the run, and a hostile guest cannot poison what another installs: the cache is
//! written by this host process only, from upstream's answers, and every guest still checks
//! what it gets against its own keys.
//!
//! Only plain `http://` sources are shared: `CONNECT` is refused (405), so sources over
//! `https://` are fetched by each guest itself, not shared. Only clients that know their
//! label's token, derived from the run's random secret, are served (407 otherwise), and the
//! proxy refuses to reach the host's own loopback services (403).
//!
//! The cache lives for one run: its index is in memory, its files in `DIR/objects/`, one per
//! URL, named by the BLAKE3 of the URL and renamed into place only when complete.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Serialize;
use tiny_http::{Header, Method, Request, Response, Server, StatusCode};
use ureq::config::{AutoHeaderValue, Config};
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

use crate::error::Error;

/// The largest response the proxy takes from upstream by default: 4 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 4 << 30;

/// The longest request URL the proxy accepts (8 KiB); longer ones get 414.
pub const MAX_URL_LEN: usize = 8 * 1024;

/// The realm of the proxy's `Proxy-Authenticate` challenge.
const REALM: &str = "cowherd";

/// Connecting to upstream (and resolving its name) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Upstream silent for this long while the proxy waits for an answer or for body bytes: the
/// fetch fails.
const IDLE_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How long dropping the cache waits for requests still being answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How the proxy is run: [`CacheOptions::default`] is what [`DownloadCache::start`] uses.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Let clients fetch from loopback addresses (`localhost`, 127.0.0.0/8, `::1`): for tests
    /// whose upstream runs on this host. Off in production, where the proxy must not be a way
    /// to reach the host's local services or itself.
    pub allow_loopback: bool,
    /// The largest response body taken from upstream, in bytes; a bigger one is answered 502
    /// and nothing of it is cached.
    pub max_bytes: u64,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            allow_loopback: false,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// What one client (one label, a guest) got from the proxy so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClientStats {
    /// Requests that carried the right token, whatever their answer.
    pub requests: u64,
    /// Body bytes sent to the client (`HEAD` answers count none).
    pub bytes_served: u64,
    /// Body bytes fetched from upstream on its behalf: the first requester of a URL pays for it.
    pub upstream_bytes: u64,
    /// Requests answered from the cache without an upstream fetch of their own (including
    /// those that waited for another client's fetch of the same URL).
    pub hits: u64,
}

/// The proxy's figures so far: totals and per client label.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Body bytes received from upstream, in all (the sum of the clients' `upstream_bytes`).
    pub upstream_bytes: u64,
    /// Requests the proxy made upstream, failed ones included.
    pub upstream_requests: u64,
    /// Per client label.
    pub clients: BTreeMap<String, ClientStats>,
}

/// A caching HTTP forward proxy on 127.0.0.1 for one fleet upgrade (see the module's doc).
/// Dropping it stops the server.
pub struct DownloadCache {
    shared: Arc<Shared>,
    server: Arc<Server>,
    port: u16,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DownloadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DownloadCache")
            .field("port", &self.port)
            .field("dir", &self.shared.objects)
            .finish_non_exhaustive()
    }
}

impl DownloadCache {
    /// Starts the proxy on 127.0.0.1, on a port chosen by the kernel, with its cache in `dir`,
    /// which it creates (mode 0700; the caller removes it when done). Production settings:
    /// [`CacheOptions::default`].
    ///
    /// # Errors
    /// [`Error::DownloadCache`] if `dir`'s parent is not a directory owned by root and closed
    /// to everyone else (mode 0700 or stricter), or if the listening socket cannot be opened;
    /// [`Error::Io`] if `dir` exists already or cannot be created.
    pub fn start(dir: &Path) -> Result<DownloadCache, Error> {
        DownloadCache::start_with(dir, CacheOptions::default())
    }

    /// [`DownloadCache::start`] with the given options.
    ///
    /// # Errors
    /// As [`DownloadCache::start`].
    pub fn start_with(dir: &Path, options: CacheOptions) -> Result<DownloadCache, Error> {
        let objects = make_cache_dir(dir)?;
        let address = "127.0.0.1:0";
        let server = Server::http(address).map_err(|e| Error::DownloadCache {
            at: address.to_string(),
            message: format!("cannot listen: {e}"),
        })?;
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .ok_or_else(|| Error::DownloadCache {
                at: address.to_string(),
                message: "the server did not listen on an IP address".to_string(),
            })?;
        let shared = Arc::new(Shared {
            objects,
            key: rand::random::<[u8; 32]>(),
            agent: upstream_agent(options.allow_loopback),
            options,
            entries: Mutex::new(HashMap::new()),
            stats: Mutex::new(CacheStats::default()),
            stop: AtomicBool::new(false),
            active: Mutex::new(0),
            idle: Condvar::new(),
            partial_seq: AtomicU64::new(0),
        });
        let server = Arc::new(server);
        let acceptor = {
            let (shared, server) = (Arc::clone(&shared), Arc::clone(&server));
            std::thread::Builder::new()
                .name("cowherd-proxy".into())
                .spawn(move || accept_loop(&shared, &server))
                .map_err(|e| Error::DownloadCache {
                    at: format!("127.0.0.1:{port}"),
                    message: format!("cannot start the server thread: {e}"),
                })?
        };
        Ok(DownloadCache {
            shared,
            server,
            port,
            acceptor: Some(acceptor),
        })
    }

    /// The proxy URL for client `label` (a guest's name), with the label's token as its
    /// password: `http://LABEL:TOKEN@127.0.0.1:PORT/`, for apt's `Acquire::http::Proxy`. The
    /// token (32 hex digits, 128 bits) is the keyed BLAKE3 of the label under the run's random
    /// secret: unguessable, and a client that knows its own cannot pass for another label.
    ///
    /// # Panics
    /// If `label` is not 1–64 characters of `a-z A-Z 0-9 . _ -` (every guest name is).
    pub fn proxy_url(&self, label: &str) -> String {
        assert!(
            valid_label(label),
            "invalid proxy label {label:?}: use 1-64 characters of a-z A-Z 0-9 . _ -"
        );
        format!(
            "http://{label}:{}@127.0.0.1:{}/",
            self.shared.token(label),
            self.port
        )
    }

    /// The port the proxy listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Per-label and total figures so far.
    pub fn stats(&self) -> CacheStats {
        lock(&self.shared.stats).clone()
    }
}

impl Drop for DownloadCache {
    /// Stops accepting requests, and waits a few seconds at most for those being answered:
    /// their transfers are cut at the next block.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut active = lock(&self.shared.active);
        while *active > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            active = self
                .shared
                .idle
                .wait_timeout(active, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Whether `label` is 1–64 characters of `a-z A-Z 0-9 . _ -`.
fn valid_label(label: &str) -> bool {
    (1..=64).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Locks `mutex`, through a poisoning (a panicked holder leaves consistent figures here).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Creates `dir` (0700) and `dir/objects` (0700) below a parent reachable by root only.
fn make_cache_dir(dir: &Path) -> Result<PathBuf, Error> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let meta = fs::metadata(parent).map_err(|error| Error::Io {
        path: parent.to_path_buf(),
        error,
    })?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(Error::DownloadCache {
            at: dir.display().to_string(),
            message: format!(
                "its parent {} must be a directory owned by root with mode 0700 (it is uid {}, mode {:o})",
                parent.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        });
    }
    let objects = dir.join("objects");
    for d in [dir, objects.as_path()] {
        let io = |error| Error::Io {
            path: d.to_path_buf(),
            error,
        };
        fs::DirBuilder::new().mode(0o700).create(d).map_err(io)?;
        fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(objects)
}

/// The upstream client: no redirects followed (apt follows them through the proxy, where the
/// checks apply again), no status taken as an error, no compression asked for (the bytes are
/// upstream's), the host's proxy environment as ureq reads it, and the timeouts above.
fn upstream_agent(allow_loopback: bool) -> ureq::Agent {
    let config = Config::builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .accept_encoding(AutoHeaderValue::None)
        .user_agent(concat!("cowherd/", env!("CARGO_PKG_VERSION")))
        .timeout_resolve(Some(CONNECT_TIMEOUT))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(IDLE_READ_TIMEOUT))
        .timeout_per_read(Some(IDLE_READ_TIMEOUT))
        .max_idle_connections_per_host(8)
        .build();
    ureq::Agent::with_parts(
        config,
        DefaultConnector::default(),
        NoLoopbackResolver { allow_loopback },
    )
}

/// The default resolver, less the loopback and unspecified addresses of upstream hosts (unless
/// allowed): a name that resolves to the host itself is not reached. The address of a proxy
/// from the environment is kept as it is.
#[derive(Debug)]
struct NoLoopbackResolver {
    allow_loopback: bool,
}

impl Resolver for NoLoopbackResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = DefaultResolver::default().resolve(uri, config, timeout)?;
        let is_proxy = config
            .proxy()
            .is_some_and(|p| uri.host().is_some_and(|h| h.eq_ignore_ascii_case(p.host())));
        if self.allow_loopback || is_proxy {
            return Ok(addrs);
        }
        let mut kept = self.empty();
        for addr in addrs.iter().filter(|a| !is_local_ip(a.ip())) {
            kept.push(*addr);
        }
        if kept.is_empty() {
            return Err(ureq::Error::Io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the host name resolves to this host's own (loopback) addresses only",
            )));
        }
        Ok(kept)
    }
}

/// Loopback (127.0.0.0/8, `::1`, also IPv4-mapped) and unspecified addresses (which reach
/// this host too).
fn is_local_ip(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback() || ip.is_unspecified()
}

/// Whether a URL's host names this host: `localhost` (and `*.localhost`) or a local address.
fn is_local_host(host: &str) -> bool {
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(is_local_ip)
}

/// What both the server threads and the handle share.
struct Shared {
    /// `dir/objects`: one file per cached URL, named by the BLAKE3 of the URL.
    objects: PathBuf,
    /// The run's random secret, from which each label's password is derived.
    key: [u8; 32],
    options: CacheOptions,
    agent: ureq::Agent,
    /// Per URL, its cached answer or the fetch under way.
    entries: Mutex<HashMap<String, Slot>>,
    stats: Mutex<CacheStats>,
    /// Set when the cache is dropped: transfers stop at their next block.
    stop: AtomicBool,
    /// Requests being answered, and its signal when it falls to zero.
    active: Mutex<usize>,
    idle: Condvar,
    /// Makes the temporary names of concurrent fetches unique.
    partial_seq: AtomicU64,
}

/// A URL's state in the cache.
enum Slot {
    /// Being fetched by one request; the others wait on it.
    Fetching(Arc<Flight>),
    /// Fetched and complete on disk.
    Ready(Arc<Entry>),
}

/// One upstream fetch that several requests wait for.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Result<Arc<Entry>, String>>>,
    done: Condvar,
}

impl Flight {
    fn wait(&self) -> Result<Arc<Entry>, String> {
        let mut result = lock(&self.result);
        loop {
            if let Some(r) = result.as_ref() {
                return r.clone();
            }
            result = self
                .done
                .wait(result)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A cached answer: upstream's status and headers, the body in `path`.
#[derive(Debug)]
struct Entry {
    status: u16,
    content_type: Option<String>,
    last_modified: Option<String>,
    location: Option<String>,
    len: u64,
    path: PathBuf,
}

/// Ends a flight: records its result (a success in the cache, a failure nowhere so that a
/// later request retries) and wakes its waiters. If dropped unfinished, the flight fails.
struct FlightGuard<'a> {
    shared: &'a Shared,
    url: &'a str,
    flight: Arc<Flight>,
    finished: bool,
}

impl FlightGuard<'_> {
    fn finish(&mut self, result: Result<Arc<Entry>, String>) -> Result<Arc<Entry>, String> {
        self.finished = true;
        {
            let mut entries = lock(&self.shared.entries);
            match &result {
                Ok(entry) => {
                    entries.insert(self.url.to_string(), Slot::Ready(Arc::clone(entry)));
                }
                Err(_) => {
                    entries.remove(self.url);
                }
            }
        }
        *lock(&self.flight.result) = Some(result.clone());
        self.flight.done.notify_all();
        result
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.finish(Err("the fetch was interrupted".to_string()));
        }
    }
}

/// Removes a partial download unless it was renamed into place.
struct PartialFile {
    path: PathBuf,
    kept: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Counts a request being answered, for the drain on drop.
struct ActiveGuard<'a>(&'a Shared);

impl<'a> ActiveGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        *lock(&shared.active) += 1;
        ActiveGuard(shared)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        let mut active = lock(&self.0.active);
        *active = active.saturating_sub(1);
        if *active == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// A reader that fails once the cache is being dropped, so that no transfer outlives it long.
struct StopReader<'a, R> {
    inner: R,
    stop: &'a AtomicBool,
}

impl<R: Read> Read for StopReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            // Not `Interrupted`, which `io::copy` would retry.
            return Err(io::Error::other("the download cache is stopping"));
        }
        self.inner.read(buf)
    }
}

/// Takes requests off the server until the cache is dropped, each answered on its own thread
/// so that a slow upstream fetch delays no other client.
fn accept_loop(shared: &Arc<Shared>, server: &Arc<Server>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let request = match server.recv_timeout(Duration::from_millis(500)) {
            Ok(Some(request)) => request,
            Ok(None) => continue,
            Err(_) => {
                // An accept error (or the unblock of a drop): do not spin on it.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let worker = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("cowherd-proxy-req".into())
            .spawn(move || {
                let _active = ActiveGuard::new(&worker);
                worker.serve(request);
            });
        // Without a thread the request is dropped, which tiny_http answers with a 500.
        drop(spawned);
    }
}

/// A refusal or failure, sent as a short text body.
struct Refusal {
    status: u16,
    message: String,
    challenge: bool,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
        challenge: false,
    }
}

/// A header for tiny_http; `None` if the value is not a valid header value.
fn header(field: &str, value: &str) -> Option<Header> {
    Header::from_bytes(field.as_bytes(), value.as_bytes()).ok()
}

impl Shared {
    /// The password of `label`: 32 hex digits of its keyed BLAKE3 under the run's secret.
    fn token(&self, label: &str) -> String {
        let hash = blake3::keyed_hash(&self.key, label.as_bytes()).to_hex();
        hash.as_str()[..32].to_string()
    }

    /// Answers one request.
    ///
    /// # Algorithm
    /// 1. Authenticate: `Proxy-Authorization: Basic base64(LABEL:TOKEN)` with a valid label and
    ///    its token, else 407 with a `Proxy-Authenticate` challenge.
    /// 2. Only `GET` and `HEAD` (else 405), a URL of at most [`MAX_URL_LEN`] bytes (else 414),
    ///    in absolute form with the `http` scheme and no user info (else 400), whose host is
    ///    not this host's loopback unless allowed (else 403).
    /// 3. Look the URL up (a `HEAD` as a `GET`): a complete cached answer is served (a hit);
    ///    a fetch under way by another request is waited for, then served (a hit); otherwise
    ///    this request fetches it (single flight) and pays for its bytes.
    /// 4. The fetch: `GET` upstream, no redirect followed. 200, 404 and 410 answers, and
    ///    redirects with a `Location`, are cached with their status, `Content-Type`,
    ///    `Last-Modified` and `Location`; the body goes to a temporary file in `objects/`,
    ///    renamed to the BLAKE3 of the URL when complete. Any other status, a network error,
    ///    a timeout, or a body over `max_bytes` is a 502, and nothing is cached (the
    ///    temporary file is removed; a later request fetches again).
    /// 5. The answer: the cached status and headers with the full body from the file and its
    ///    `Content-Length` (headers only for `HEAD`). `Range` and conditional headers are
    ///    ignored: a full answer is always valid for them.
    fn serve(&self, request: Request) {
        let label = match self.authenticate(&request) {
            Ok(label) => label,
            Err(refusal) => return self.send_refusal(request, None, refusal),
        };
        lock(&self.stats)
            .clients
            .entry(label.clone())
            .or_default()
            .requests += 1;
        match self.lookup(&request, &label) {
            Ok((entry, hit)) => self.send_entry(request, &label, &entry, hit),
            Err(refusal) => self.send_refusal(request, Some(&label), refusal),
        }
    }

    /// The label of a request with the right credentials.
    fn authenticate(&self, request: &Request) -> Result<String, Refusal> {
        let denied = |message: &str| Refusal {
            status: 407,
            message: message.to_string(),
            challenge: true,
        };
        let value = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Proxy-Authorization"))
            .map(|h| h.value.as_str().trim())
            .ok_or_else(|| denied("proxy credentials required"))?;
        let (scheme, encoded) = value
            .split_once(' ')
            .ok_or_else(|| denied("malformed proxy credentials"))?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(denied("only Basic proxy credentials are accepted"));
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| denied("malformed proxy credentials"))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| denied("malformed proxy credentials"))?;
        let (label, token) = decoded
            .split_once(':')
            .ok_or_else(|| denied("malformed proxy credentials"))?;
        if !valid_label(label) {
            return Err(denied(
                "invalid proxy label: use 1-64 characters of a-z A-Z 0-9 . _ -",
            ));
        }
        if !same_secret(token.as_bytes(), self.token(label).as_bytes()) {
            return Err(denied("wrong proxy credentials"));
        }
        Ok(label.to_string())
    }

    /// Steps 2 and 3 of [`Shared::serve`]: the checks, then the cached or fetched answer and
    /// whether it was a hit.
    fn lookup(&self, request: &Request, label: &str) -> Result<(Arc<Entry>, bool), Refusal> {
        match request.method() {
            Method::Get | Method::Head => {}
            other => {
                return Err(refuse(
                    405,
                    format!(
                        "{other} is not served: only GET and HEAD of http:// URLs (https sources are fetched by each guest itself)"
                    ),
                ));
            }
        }
        let url = request.url();
        if url.len() > MAX_URL_LEN {
            return Err(refuse(414, format!("URL longer than {MAX_URL_LEN} bytes")));
        }
        let uri: Uri = url
            .parse()
            .map_err(|_| refuse(400, "malformed request URL"))?;
        let authority = match (uri.scheme_str(), uri.authority()) {
            (Some(s), Some(a)) if s.eq_ignore_ascii_case("http") => a,
            _ => {
                return Err(refuse(
                    400,
                    "not a proxy request: the URL must be absolute and http://",
                ));
            }
        };
        if authority.as_str().contains('@') || authority.host().is_empty() {
            return Err(refuse(400, "the URL must name a host and no user"));
        }
        if !self.options.allow_loopback && is_local_host(authority.host()) {
            return Err(refuse(
                403,
                format!(
                    "{} is this host: not reached through the proxy",
                    authority.host()
                ),
            ));
        }
        self.get_or_fetch(url, label).map_err(|e| refuse(502, e))
    }

    /// The URL's cached answer, waiting for a fetch under way, or fetching it.
    fn get_or_fetch(&self, url: &str, label: &str) -> Result<(Arc<Entry>, bool), String> {
        let flight = {
            let mut entries = lock(&self.entries);
            match entries.get(url) {
                Some(Slot::Ready(entry)) => return Ok((Arc::clone(entry), true)),
                Some(Slot::Fetching(flight)) => {
                    let flight = Arc::clone(flight);
                    drop(entries);
                    return flight.wait().map(|entry| (entry, true));
                }
                None => {
                    let flight = Arc::new(Flight::default());
                    entries.insert(url.to_string(), Slot::Fetching(Arc::clone(&flight)));
                    flight
                }
            }
        };
        let mut guard = FlightGuard {
            shared: self,
            url,
            flight,
            finished: false,
        };
        let result = self.fetch(url, label).map(Arc::new);
        guard.finish(result).map(|entry| (entry, false))
    }

    /// Step 4 of [`Shared::serve`]: one upstream fetch into the cache, charged to `label`.
    fn fetch(&self, url: &str, label: &str) -> Result<Entry, String> {
        lock(&self.stats).upstream_requests += 1;
        let mut received = 0u64;
        let result = self.fetch_into_cache(url, &mut received);
        let mut stats = lock(&self.stats);
        stats.upstream_bytes += received;
        stats
            .clients
            .entry(label.to_string())
            .or_default()
            .upstream_bytes += received;
        result
    }

    fn fetch_into_cache(&self, url: &str, received: &mut u64) -> Result<Entry, String> {
        let max = self.options.max_bytes;
        let response = self
            .agent
            .get(url)
            .call()
            .map_err(|e| format!("fetching {url}: {e}"))?;
        let status = response.status().as_u16();
        let text = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let location = text("location");
        let cacheable = matches!(status, 200 | 404 | 410)
            || (matches!(status, 301 | 302 | 303 | 307 | 308) && location.is_some());
        if !cacheable {
            return Err(format!("fetching {url}: upstream answered {status}"));
        }
        if response
            .body()
            .content_length()
            .is_some_and(|len| len > max)
        {
            return Err(format!(
                "fetching {url}: the answer is larger than {max} bytes"
            ));
        }
        let (content_type, last_modified) = (text("content-type"), text("last-modified"));

        let key = blake3::hash(url.as_bytes()).to_hex();
        let seq = self.partial_seq.fetch_add(1, Ordering::Relaxed);
        let mut partial = PartialFile {
            path: self.objects.join(format!(".partial-{key}-{seq}")),
            kept: false,
        };
        let local = |e: io::Error| format!("{}: {e}", partial.path.display());
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial.path)
            .map_err(local)?;
        let mut body = StopReader {
            inner: response.into_body().into_reader(),
            stop: &self.stop,
        };
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("fetching {url}: {e}")),
            };
            *received += n as u64;
            if *received > max {
                return Err(format!(
                    "fetching {url}: the answer is larger than {max} bytes"
                ));
            }
            file.write_all(&buf[..n]).map_err(local)?;
        }
        file.flush().map_err(local)?;
        drop(file);
        let path = self.objects.join(key.as_str());
        fs::rename(&partial.path, &path).map_err(local)?;
        partial.kept = true;
        Ok(Entry {
            status,
            content_type,
            last_modified,
            location,
            len: *received,
            path,
        })
    }

    /// Step 5 of [`Shared::serve`].
    fn send_entry(&self, request: Request, label: &str, entry: &Entry, hit: bool) {
        let file = match File::open(&entry.path) {
            Ok(file) => file,
            Err(e) => {
                let message = format!("{}: {e}", entry.path.display());
                return self.send_refusal(request, Some(label), refuse(502, message));
            }
        };
        let Ok(len) = usize::try_from(entry.len) else {
            return self.send_refusal(request, Some(label), refuse(502, "answer too large"));
        };
        let headers: Vec<Header> = [
            Some(("Server", "cowherd")),
            Some(("X-Cache", if hit { "HIT" } else { "MISS" })),
            entry.content_type.as_deref().map(|v| ("Content-Type", v)),
            entry.last_modified.as_deref().map(|v| ("Last-Modified", v)),
            entry.location.as_deref().map(|v| ("Location", v)),
        ]
        .into_iter()
        .flatten()
        .filter_map(|(f, v)| header(f, v))
        .collect();
        let is_get = *request.method() == Method::Get;
        let body = StopReader {
            inner: file,
            stop: &self.stop,
        };
        // A Content-Length always, however large (tiny_http would chunk bigger bodies).
        let response = Response::new(StatusCode(entry.status), headers, body, Some(len), None)
            .with_chunked_threshold(usize::MAX);
        let sent = request.respond(response).is_ok();
        let mut stats = lock(&self.stats);
        let client = stats.clients.entry(label.to_string()).or_default();
        if hit {
            client.hits += 1;
        }
        if sent && is_get {
            client.bytes_served += entry.len;
        }
    }

    fn send_refusal(&self, request: Request, label: Option<&str>, refusal: Refusal) {
        let mut response = Response::from_string(format!("{}\n", refusal.message))
            .with_status_code(refusal.status);
        for h in [
            header("Server", "cowherd"),
            header("Content-Type", "text/plain; charset=utf-8"),
        ]
        .into_iter()
        .flatten()
        {
            response.add_header(h);
        }
        let challenge = format!("Basic realm=\"{REALM}\"");
        if refusal.challenge
            && let Some(h) = header("Proxy-Authenticate", &challenge)
        {
            response.add_header(h);
        }
        let is_get = *request.method() == Method::Get;
        let len = refusal.message.len() as u64 + 1;
        let sent = request.respond(response).is_ok();
        if let (Some(label), true, true) = (label, sent, is_get) {
            lock(&self.stats)
                .clients
                .entry(label.to_string())
                .or_default()
                .bytes_served += len;
        }
    }
}

/// Compares two secrets in a time that depends on their lengths only.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_guest_names() {
        assert!(valid_label("web-01.example_a"));
        assert!(valid_label(&"a".repeat(64)));
        assert!(!valid_label(""));
        assert!(!valid_label(&"a".repeat(65)));
        assert!(!valid_label("a:b"));
        assert!(!valid_label("a b"));
        assert!(!valid_label("é"));
    }

    #[test]
    fn local_hosts_are_recognised() {
        for host in [
            "localhost",
            "LOCALHOST.",
            "foo.localhost",
            "127.0.0.1",
            "127.8.9.10",
            "[::1]",
            "[::ffff:127.0.0.1]",
            "0.0.0.0",
            "[::]",
        ] {
            assert!(is_local_host(host), "{host}");
        }
        for host in [
            "example.invalid",
            "10.0.0.1",
            "[2001:db8::1]",
            "localhost.example",
        ] {
            assert!(!is_local_host(host), "{host}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abcd", b"abcd"));
        assert!(!same_secret(b"abcd", b"abce"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
