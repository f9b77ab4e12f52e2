//! Name resolution for the sync client: each server name is looked up at
//! most once a minute.
//!
//! ureq resolves the server's name for every request, even one that goes
//! out on a kept connection, and with a timeout set it does so on a thread
//! of its own: a thread started, and the system's resolver asked, at every
//! sync. A server that moves is found again once its entry is a minute
//! old (a sync that fails meanwhile is retried as any other).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How long an answer is used.
const KEEP: Duration = Duration::from_secs(60);

/// Remembers `inner`'s answers for `keep`; failures are not remembered.
#[derive(Debug)]
pub(crate) struct CachingResolver<R = DefaultResolver> {
    inner: R,
    keep: Duration,
    answers: Mutex<HashMap<String, (Instant, ResolvedSocketAddrs)>>,
}

impl Default for CachingResolver {
    fn default() -> Self {
        CachingResolver::new(DefaultResolver::default(), KEEP)
    }
}

impl<R: Resolver> CachingResolver<R> {
    fn new(inner: R, keep: Duration) -> Self {
        CachingResolver {
            inner,
            keep,
            answers: Mutex::new(HashMap::new()),
        }
    }
}

impl<R: Resolver> Resolver for CachingResolver<R> {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        // Scheme and authority: the port defaults by scheme. The address
        // family asked for changes the answer.
        let key = format!(
            "{:?} {}://{}",
            config.ip_family(),
            uri.scheme_str().unwrap_or(""),
            uri.authority().map_or("", |a| a.as_str())
        );
        {
            let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, addrs)) = answers.get(&key) {
                if at.elapsed() < self.keep {
                    return Ok(addrs.clone());
                }
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        // Few servers per app: old entries go when the map grows anyway.
        if answers.len() >= 64 {
            answers.retain(|_, (at, _)| at.elapsed() < self.keep);
        }
        answers.insert(key, (Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers 127.0.0.1 with the URI's port, or fails for the host
    /// `nowhere`; counts the questions.
    #[derive(Debug, Default)]
    struct Counting(AtomicUsize);

    impl Resolver for Counting {
        fn resolve(
            &self,
            uri: &Uri,
            _: &Config,
            _: NextTimeout,
        ) -> Result<ResolvedSocketAddrs, ureq::Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            if uri.host() == Some("nowhere") {
                return Err(ureq::Error::HostNotFound);
            }
            let mut addrs = self.empty();
            let port = uri.port_u16().unwrap_or(80);
            addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
            Ok(addrs)
        }
    }

    fn ask<R: Resolver>(r: &CachingResolver<R>, uri: &str) -> Result<Vec<SocketAddr>, ureq::Error> {
        let config = Config::default();
        let timeout = NextTimeout {
            after: ureq::unversioned::transport::time::Duration::NotHappening,
            reason: ureq::Timeout::Resolve,
            per_read: None,
            per_write: None,
        };
        r.resolve(&uri.parse().unwrap(), &config, timeout)
            .map(|a| a.iter().copied().collect())
    }

    #[test]
    fn a_name_is_asked_once_while_its_answer_is_fresh() {
        let r = CachingResolver::new(Counting::default(), Duration::from_secs(60));
        let first = ask(&r, "http://sync.example:8080/v1/spaces/a/sync").unwrap();
        let again = ask(&r, "http://sync.example:8080/v1/spaces/b/changes").unwrap();
        assert_eq!(first, again);
        assert_eq!(r.inner.0.load(Ordering::SeqCst), 1);
        // Another port, another scheme: other answers.
        assert_eq!(
            ask(&r, "http://sync.example:9090/").unwrap()[0].port(),
            9090
        );
        ask(&r, "https://sync.example:8080/").unwrap();
        assert_eq!(r.inner.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn old_answers_and_failures_are_asked_again() {
        let r = CachingResolver::new(Counting::default(), Duration::ZERO);
        ask(&r, "http://sync.example/").unwrap();
        ask(&r, "http://sync.example/").unwrap();
        assert_eq!(r.inner.0.load(Ordering::SeqCst), 2);
        let r = CachingResolver::new(Counting::default(), Duration::from_secs(60));
        assert!(ask(&r, "http://nowhere/").is_err());
        assert!(ask(&r, "http://nowhere/").is_err());
        assert_eq!(r.inner.0.load(Ordering::SeqCst), 2);
    }
}
