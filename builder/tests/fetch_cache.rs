//! The download cache of a fleet upgrade (`DownloadCache`), over real sockets: concurrent
//! clients of one URL cause one upstream fetch and get the same bytes; 404s are cached and
//! server errors are not; unauthenticated, non-GET, loopback, over-long and over-large requests
//! are refused; a large body streams through intact; and the host's own apt, run twice through
//! the proxy as two clients, fetches the archive's indexes once.
//!
//! Upstreams here are tiny_http servers on 127.0.0.1 that count their hits; the client is a
//! raw HTTP/1.1 client speaking to the proxy as apt does (absolute-form request lines).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use base64::Engine as _;
use cowherd_builder::{CacheOptions, DownloadCache, Error};

// ---------------------------------------------------------------------------------------------
// An upstream server that counts its hits.

/// What the upstream answers for a path: status, body, whether to send a Content-Length.
type Route = (u16, Arc<Vec<u8>>, bool);

struct Upstream {
    server: Arc<tiny_http::Server>,
    port: u16,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Upstream {
    /// Serves `routes` (path → answer), anything else 404, each answer after `delay`.
    fn start(routes: HashMap<&str, Route>, delay: Duration) -> Upstream {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("upstream listens"));
        let port = server.server_addr().to_ip().expect("an IP address").port();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let routes: HashMap<String, Route> = routes
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let routes = Arc::new(routes);
        let thread = {
            let (server, hits) = (Arc::clone(&server), Arc::clone(&hits));
            thread::spawn(move || {
                for request in server.incoming_requests() {
                    let routes = Arc::clone(&routes);
                    let hits = Arc::clone(&hits);
                    thread::spawn(move || {
                        let path = request.url().to_string();
                        *hits.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
                        thread::sleep(delay);
                        let (status, body, with_length) = routes.get(&path).cloned().unwrap_or((
                            404,
                            Arc::new(b"not here\n".to_vec()),
                            true,
                        ));
                        let len = with_length.then_some(body.len());
                        let headers = vec![
                            tiny_http::Header::from_bytes("Content-Type", "application/x-test")
                                .unwrap(),
                            tiny_http::Header::from_bytes(
                                "Last-Modified",
                                "Sat, 01 Jun 2024 10:00:00 GMT",
                            )
                            .unwrap(),
                        ];
                        let reader = std::io::Cursor::new(body.as_slice().to_vec());
                        let response = tiny_http::Response::new(
                            tiny_http::StatusCode(status),
                            headers,
                            reader,
                            len,
                            None,
                        );
                        let _ = request.respond(response);
                    });
                }
            })
        };
        Upstream {
            server,
            port,
            hits,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client, speaking to a proxy as apt does.

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `Proxy-Authorization` for the credentials in a proxy URL.
fn credentials(proxy_url: &str) -> String {
    let userinfo = proxy_url
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once('@'))
        .expect("a proxy URL with credentials")
        .0;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(userinfo)
    )
}

fn basic(userinfo: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(userinfo)
    )
}

/// The token of a proxy URL.
fn token(proxy_url: &str) -> String {
    let userinfo = proxy_url["http://".len()..].split_once('@').unwrap().0;
    userinfo.split_once(':').unwrap().1.to_string()
}

struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(cache: &DownloadCache) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", cache.port())).expect("connect to proxy");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends one request (does not wait for its answer).
    fn send(&mut self, method: &str, target: &str, auth: Option<&str>, extra: &[(&str, &str)]) {
        let mut text = format!("{method} {target} HTTP/1.1\r\nHost: proxied\r\n");
        if let Some(auth) = auth {
            text.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        for (name, value) in extra {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("\r\n");
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Reads one answer (no body for a HEAD, else by Content-Length or chunked).
    fn read(&mut self, head: bool) -> Reply {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("header line");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("header");
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        if head {
            return reply;
        }
        if let Some(len) = reply.header("Content-Length") {
            let len: usize = len.parse().unwrap();
            reply.body.resize(len, 0);
            self.reader.read_exact(&mut reply.body).expect("body");
        } else if reply
            .header("Transfer-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size).unwrap();
                let size = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk).unwrap();
                if size == 0 {
                    break;
                }
                reply.body.extend_from_slice(&chunk[..size]);
            }
        }
        reply
    }

    fn get(&mut self, url: &str, auth: &str) -> Reply {
        self.send("GET", url, Some(auth), &[]);
        self.read(false)
    }
}

/// One GET on a new connection.
fn get(cache: &DownloadCache, label: &str, url: &str) -> Reply {
    Client::connect(cache).get(url, &credentials(&cache.proxy_url(label)))
}

/// Bytes that look random, from a seed.
fn generated(seed: &str, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut bytes);
    bytes
}

fn route(status: u16, body: Vec<u8>) -> Route {
    (status, Arc::new(body), true)
}

fn testing() -> CacheOptions {
    CacheOptions {
        allow_loopback: true,
        ..CacheOptions::default()
    }
}

/// The names in the cache's `objects/`.
fn cache_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// A scratch directory reachable by root only, as the cache's parent must be.
fn root_only_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o700)).unwrap();
    dir
}

fn is_object_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_clients_of_one_url_cause_one_upstream_fetch_and_get_the_same_bytes() {
    let body = generated("package", 1 << 20);
    let upstream = Upstream::start(
        HashMap::from([("/pool/p.deb", route(200, body.clone()))]),
        Duration::from_millis(400),
    );
    let top = root_only_dir();
    let cache = Arc::new(DownloadCache::start_with(&top.path().join("c"), testing()).unwrap());
    let url = upstream.url("/pool/p.deb");

    let clients = 8;
    let replies: Vec<Reply> = thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let (cache, url) = (&cache, &url);
                s.spawn(move || get(cache, &format!("guest-{i}"), url))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    assert_eq!(upstream.hits("/pool/p.deb"), 1, "one upstream fetch");
    for reply in &replies {
        assert_eq!(reply.status, 200);
        assert!(reply.body == body, "every client gets upstream's bytes");
        assert_eq!(reply.header("Content-Type"), Some("application/x-test"));
    }
    let misses = replies
        .iter()
        .filter(|r| r.header("X-Cache") == Some("MISS"))
        .count();
    assert_eq!(misses, 1);

    let stats = cache.stats();
    let len = body.len() as u64;
    assert_eq!(stats.upstream_requests, 1);
    assert_eq!(stats.upstream_bytes, len);
    assert_eq!(stats.clients.len(), clients);
    let payers: Vec<_> = stats
        .clients
        .iter()
        .filter(|(_, c)| c.upstream_bytes > 0)
        .collect();
    assert_eq!(payers.len(), 1, "the first requester pays: {stats:?}");
    assert_eq!(payers[0].1.upstream_bytes, len);
    assert_eq!(payers[0].1.hits, 0);
    for (label, c) in &stats.clients {
        assert_eq!(c.requests, 1, "{label}");
        assert_eq!(c.bytes_served, len, "{label}");
        if c.upstream_bytes == 0 {
            assert_eq!(c.hits, 1, "{label}");
        }
    }
    let json = serde_json::to_value(&stats).unwrap();
    assert_eq!(json["upstream_bytes"], len);
    assert_eq!(json["clients"]["guest-0"]["requests"], 1);

    // Later requests are hits too, and nothing was left half-written.
    let again = get(&cache, "guest-0", &url);
    assert_eq!((again.status, again.header("X-Cache")), (200, Some("HIT")));
    assert_eq!(upstream.hits("/pool/p.deb"), 1);
    let files = cache_files(&top.path().join("c"));
    assert_eq!(files.len(), 1);
    assert!(is_object_name(&files[0]));
}

#[test]
fn not_found_is_cached_and_server_errors_are_not() {
    let upstream = Upstream::start(
        HashMap::from([
            ("/gone", route(410, b"gone\n".to_vec())),
            ("/broken", route(503, b"busy\n".to_vec())),
        ]),
        Duration::ZERO,
    );
    let top = root_only_dir();
    let cache = DownloadCache::start_with(&top.path().join("c"), testing()).unwrap();

    for _ in 0..3 {
        let reply = get(&cache, "g1", &upstream.url("/dists/x/Translation-xx.xz"));
        assert_eq!(reply.status, 404);
        assert_eq!(reply.body, b"not here\n");
        assert_eq!(get(&cache, "g2", &upstream.url("/gone")).status, 410);
    }
    assert_eq!(
        upstream.hits("/dists/x/Translation-xx.xz"),
        1,
        "a 404 is cached"
    );
    assert_eq!(upstream.hits("/gone"), 1, "a 410 is cached");

    for _ in 0..3 {
        let reply = get(&cache, "g1", &upstream.url("/broken"));
        assert_eq!(reply.status, 502, "{reply:?}");
        assert!(String::from_utf8_lossy(&reply.body).contains("503"));
    }
    assert_eq!(
        upstream.hits("/broken"),
        3,
        "a 5xx is not cached: each request retries"
    );
    assert_eq!(cache.stats().upstream_requests, 5);
}

#[test]
fn answers_are_whole_on_kept_alive_and_pipelined_connections() {
    let body = generated("index", 100_000);
    let upstream = Upstream::start(
        HashMap::from([
            ("/a", route(200, body.clone())),
            ("/b", route(200, b"bee".to_vec())),
        ]),
        Duration::from_millis(50),
    );
    let top = root_only_dir();
    let cache = DownloadCache::start_with(&top.path().join("c"), testing()).unwrap();
    let auth = credentials(&cache.proxy_url("g"));

    // Three requests written at once on one connection, as apt pipelines them; a Range and an
    // If-Modified-Since are ignored.
    let mut client = Client::connect(&cache);
    client.send(
        "GET",
        &upstream.url("/a"),
        Some(&auth),
        &[("Range", "bytes=0-9")],
    );
    client.send("HEAD", &upstream.url("/b"), Some(&auth), &[]);
    client.send(
        "GET",
        &upstream.url("/b"),
        Some(&auth),
        &[("If-Modified-Since", "Sat, 01 Jun 2024 10:00:00 GMT")],
    );
    let a = client.read(false);
    let b_head = client.read(true);
    let b = client.read(false);
    assert_eq!(a.status, 200);
    assert!(a.body == body);
    assert_eq!(a.header("Content-Length"), Some("100000"));
    assert_eq!(a.header("Transfer-Encoding"), None);
    assert_eq!(
        a.header("Last-Modified"),
        Some("Sat, 01 Jun 2024 10:00:00 GMT")
    );
    assert_eq!(b_head.status, 200);
    assert_eq!(b_head.header("Content-Length"), Some("3"));
    assert_eq!((b.status, b.body.as_slice()), (200, &b"bee"[..]));

    // The connection is still usable.
    let again = client.get(&upstream.url("/a"), &auth);
    assert_eq!((again.status, again.body.len()), (200, body.len()));
    assert_eq!(upstream.hits("/a"), 1);
    assert_eq!(upstream.hits("/b"), 1);
    let stats = cache.stats().clients["g"].clone();
    assert_eq!(stats.requests, 4);
    assert_eq!(stats.hits, 2);
    assert_eq!(
        stats.bytes_served,
        2 * body.len() as u64 + 3,
        "HEAD serves no body"
    );
}

#[test]
fn refuses_strangers_other_methods_the_host_itself_long_urls_and_oversized_answers() {
    let upstream = Upstream::start(
        HashMap::from([
            ("/big", route(200, vec![7; 5000])),
            ("/big-chunked", (200, Arc::new(vec![8; 5000]), false)),
            ("/small", route(200, vec![9; 1000])),
        ]),
        Duration::ZERO,
    );
    let top = root_only_dir();
    let dir = top.path().join("c");
    let cache = DownloadCache::start_with(
        &dir,
        CacheOptions {
            allow_loopback: true,
            max_bytes: 1000,
        },
    )
    .unwrap();
    let url = upstream.url("/small");
    let proxy_url = cache.proxy_url("guest-1");
    let good = credentials(&proxy_url);
    let secret = token(&proxy_url);

    let refused = |auth: Option<&str>| {
        let mut c = Client::connect(&cache);
        c.send("GET", &url, auth, &[]);
        c.read(false)
    };
    for auth in [
        None,
        Some(basic(&format!("guest-1:{}", "0".repeat(32)))),
        Some(basic(&format!("guest-1:{secret}x"))),
        // Another label's password: each label has its own.
        Some(basic(&format!("guest-2:{secret}"))),
        Some(basic(&format!("bad label:{secret}"))),
        Some(basic(&format!("{}:{secret}", "a".repeat(65)))),
        Some(basic(&format!(":{secret}"))),
        Some(basic(&secret)),
        Some("Basic !!!notbase64".to_string()),
        Some(format!("Bearer {secret}")),
    ] {
        let reply = refused(auth.as_deref());
        assert_eq!(reply.status, 407, "{auth:?}");
        assert_eq!(
            reply.header("Proxy-Authenticate"),
            Some("Basic realm=\"cowherd\"")
        );
    }
    assert_eq!(upstream.hits("/small"), 0);
    assert!(cache.stats().clients.is_empty());

    let mut c = Client::connect(&cache);
    c.send("CONNECT", "mirror.invalid:443", Some(&good), &[]);
    assert_eq!(c.read(false).status, 405);
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let mut c = Client::connect(&cache);
        c.send(method, &url, Some(&good), &[("Content-Length", "0")]);
        assert_eq!(c.read(false).status, 405, "{method}");
    }

    let long = format!("{}?{}", url, "q".repeat(9000));
    assert_eq!(get(&cache, "guest-1", &long).status, 414);
    for target in [
        "/small",
        "https://mirror.invalid/x",
        "ftp://mirror.invalid/x",
    ] {
        assert_eq!(get(&cache, "guest-1", target).status, 400, "{target}");
    }
    let mut c = Client::connect(&cache);
    c.send_raw(b"this is not http\r\n\r\n");
    assert_eq!(c.read(false).status, 400);

    // Over max_bytes: announced by Content-Length, or found while streaming. A 502, nothing
    // cached, no partial file left; a retry goes upstream again.
    for path in ["/big", "/big-chunked"] {
        for _ in 0..2 {
            let reply = get(&cache, "guest-1", &upstream.url(path));
            assert_eq!(reply.status, 502, "{path}: {reply:?}");
        }
        assert_eq!(upstream.hits(path), 2, "{path}");
    }
    let exactly = get(&cache, "guest-1", &url);
    assert_eq!((exactly.status, exactly.body.len()), (200, 1000));
    let files = cache_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(is_object_name(&files[0]), "{files:?}");

    // Without allow_loopback, the host itself is out of reach, by name or address.
    let production = DownloadCache::start(&top.path().join("p")).unwrap();
    for host in [
        format!("127.0.0.1:{}", upstream.port),
        format!("127.1.2.3:{}", upstream.port),
        format!("localhost:{}", upstream.port),
        format!("LocalHost.:{}", upstream.port),
        format!("[::1]:{}", upstream.port),
        format!("0.0.0.0:{}", upstream.port),
    ] {
        let reply = get(&production, "guest-1", &format!("http://{host}/small"));
        assert_eq!(reply.status, 403, "{host}");
    }
    // A name that only the resolver turns into a loopback address is refused too.
    let reply = get(
        &production,
        "guest-1",
        &format!("http://2130706433:{}/small", upstream.port),
    );
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(upstream.hits("/small"), 1);
}

#[test]
fn start_wants_a_new_directory_below_a_root_only_one() {
    let top = root_only_dir();
    let open = top.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, PermissionsExt::from_mode(0o755)).unwrap();
    let err = DownloadCache::start(&open.join("c")).unwrap_err();
    assert!(matches!(err, Error::DownloadCache { .. }), "{err}");
    assert!(err.to_string().contains("0700"), "{err}");

    let dir = top.path().join("c");
    let cache = DownloadCache::start(&dir).unwrap();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let err = DownloadCache::start(&dir).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    drop(cache);
}

#[test]
fn a_large_body_streams_through_intact() {
    let body = generated("big", 50 << 20);
    let expected = blake3::hash(&body);
    let upstream = Upstream::start(
        HashMap::from([("/big.deb", route(200, body))]),
        Duration::ZERO,
    );
    let top = root_only_dir();
    let cache = DownloadCache::start_with(&top.path().join("c"), testing()).unwrap();
    for label in ["first", "second"] {
        let reply = get(&cache, label, &upstream.url("/big.deb"));
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("Content-Length"), Some("52428800"));
        assert_eq!(blake3::hash(&reply.body), expected, "{label}");
    }
    assert_eq!(upstream.hits("/big.deb"), 1);
    let stats = cache.stats();
    assert_eq!(stats.clients["first"].upstream_bytes, 50 << 20);
    assert_eq!(stats.clients["second"].upstream_bytes, 0);
    assert_eq!(stats.clients["second"].hits, 1);
}

// ---------------------------------------------------------------------------------------------
// The host's apt, against the host's configured archive.

/// Runs the host's `apt-get update` with its state and cache in `scratch`, through `proxy`.
fn apt_update(scratch: &Path, proxy: &str, print_uris: bool) -> std::process::Output {
    for sub in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(scratch.join(sub)).unwrap();
    }
    let mut cmd = Command::new("apt-get");
    cmd.arg("-o")
        .arg(format!(
            "Dir::State::Lists={}",
            scratch.join("lists").display()
        ))
        .arg("-o")
        .arg(format!("Dir::Cache={}", scratch.join("cache").display()))
        .arg("-o")
        .arg(format!("Acquire::http::Proxy={proxy}"))
        .args(["-o", "APT::Update::Error-Mode=any"])
        .args(["-o", "APT::Sandbox::User=root"])
        .args(["-o", "Acquire::Retries=0"]);
    if print_uris {
        cmd.arg("--print-uris");
    }
    cmd.arg("update");
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run the host's apt-get ({e}): this test needs a Debian host with apt")
    })
}

/// Relative path → BLAKE3 of each regular file below `dir`.
fn file_hashes(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let kind = e.file_type().unwrap();
            if kind.is_dir() {
                stack.push(e.path());
            } else if kind.is_file() {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                let hash = blake3::hash(&std::fs::read(e.path()).unwrap())
                    .to_hex()
                    .to_string();
                out.insert(rel, hash);
            }
        }
    }
    out
}

#[test]
fn the_hosts_apt_updating_twice_through_the_proxy_fetches_the_archive_once() {
    let top = root_only_dir();
    let cache = DownloadCache::start(&top.path().join("cache")).unwrap();

    // The host must have http:// sources: otherwise nothing here would be shared.
    let probe = apt_update(&top.path().join("probe"), &cache.proxy_url("probe"), true);
    let uris = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success() && uris.lines().any(|l| l.starts_with("'http://")),
        "the host's apt configuration has no http:// source (or apt-get failed): this test needs \
         one to exercise the proxy against the real archive.\nstdout:\n{uris}\nstderr:\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let mut lists = Vec::new();
    for label in ["guest-a", "guest-b"] {
        let scratch = top.path().join(label);
        let out = apt_update(&scratch, &cache.proxy_url(label), false);
        assert!(
            out.status.success(),
            "apt-get update through the proxy failed for {label} (is the network to the \
             host's configured archive down?)\nstdout:\n{}\nstderr:\n{}\nproxy stats: {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            cache.stats()
        );
        lists.push(file_hashes(&scratch.join("lists")));
    }

    let stats = cache.stats();
    let (a, b) = (&stats.clients["guest-a"], &stats.clients["guest-b"]);
    assert!(a.upstream_bytes > 0, "{stats:?}");
    assert_eq!(
        b.upstream_bytes, 0,
        "the second run is served from the cache: {stats:?}"
    );
    assert!(b.requests > 0 && b.hits == b.requests, "{stats:?}");
    assert_eq!(stats.upstream_bytes, a.upstream_bytes);
    assert!(
        lists[0].keys().any(|k| k.ends_with("InRelease")),
        "{:?}",
        lists[0].keys()
    );
    assert_eq!(lists[0], lists[1], "both guests hold the same indexes");
}

#[test]
fn dropping_the_cache_stops_its_server_at_once() {
    let top = root_only_dir();
    let cache = DownloadCache::start(&top.path().join("c")).unwrap();
    let port = cache.port();
    let mut c = Client::connect(&cache);
    c.send("GET", "http://mirror.invalid/x", None, &[]);
    assert_eq!(c.read(false).status, 407);
    let started = std::time::Instant::now();
    drop(cache);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // tiny_http closes its listening socket from its own thread, just after.
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "still listening"
        );
        thread::sleep(Duration::from_millis(20));
    }
}
