//! An in-process fault-injecting layer in front of a real store ([`tresor::store::Store::wrapped`]).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// Work done once before a listing, see [`FaultyStore::before_listing`].
type ListHook = Box<dyn FnOnce() + Send>;

/// A store that misbehaves like a real one can.
///
/// - [`FaultyStore::flaky`]: a congested or flaky link: after the first `spared` reads and
///   writes, `error_rate` of them fail (half as a reset connection, half as a timeout after a
///   pause) and `slow_rate` take up to 200 ms longer.
/// - [`FaultyStore::append_only`]: a credential that may create and read but not delete: every
///   delete is refused the way an S3 server refuses it (403 Access Denied, which object_store
///   reports as `PermissionDenied`).
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    error_rate: f64,
    slow_rate: f64,
    refuse_deletes: bool,
    spared: std::sync::atomic::AtomicU64,
    state: std::sync::Mutex<u64>,
    pub injected: std::sync::atomic::AtomicU64,
    /// Objects read, with how many times each (see [`FaultyStore::counting`]).
    pub gets: std::sync::Mutex<std::collections::BTreeMap<String, u32>>,
    /// Run once, before the first listing under this prefix: another host's work landing at that
    /// moment (a forget and a gc sweep between a verification's passes).
    before_list: std::sync::Mutex<Option<(String, ListHook)>>,
}

impl FaultyStore {
    pub fn flaky(
        inner: Arc<dyn ObjectStore>,
        spared: u64,
        error_rate: f64,
        slow_rate: f64,
        seed: u64,
    ) -> FaultyStore {
        FaultyStore {
            inner,
            error_rate,
            slow_rate,
            refuse_deletes: false,
            spared: std::sync::atomic::AtomicU64::new(spared),
            state: std::sync::Mutex::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            injected: std::sync::atomic::AtomicU64::new(0),
            before_list: std::sync::Mutex::new(None),
            gets: std::sync::Mutex::default(),
        }
    }

    /// A store that runs `then` once, right before the first listing under `prefix`.
    pub fn before_listing(
        inner: Arc<dyn ObjectStore>,
        prefix: &str,
        then: impl FnOnce() + Send + 'static,
    ) -> FaultyStore {
        let store = FaultyStore::flaky(inner, 0, 0.0, 0.0, 0);
        *store.before_list.lock().unwrap() = Some((prefix.to_string(), Box::new(then)));
        store
    }

    /// A store that only counts the reads of each object, in `gets`.
    pub fn counting(inner: Arc<dyn ObjectStore>) -> FaultyStore {
        FaultyStore::flaky(inner, 0, 0.0, 0.0, 0)
    }

    pub fn append_only(inner: Arc<dyn ObjectStore>) -> FaultyStore {
        FaultyStore {
            refuse_deletes: true,
            ..FaultyStore::flaky(inner, 0, 0.0, 0.0, 0)
        }
    }

    fn roll(&self) -> f64 {
        let mut x = self.state.lock().unwrap();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn fault(&self, op: &str, path: &Path) -> Result<()> {
        let spare = self
            .spared
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if spare {
            return Ok(());
        }
        let r = self.roll();
        if r < self.error_rate {
            self.injected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let what = if r < self.error_rate / 2.0 {
                "connection reset by peer"
            } else {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                "operation timed out"
            };
            return Err(object_store::Error::Generic {
                store: "flaky",
                source: format!("injected fault on {op} {path}: {what}").into(),
            });
        }
        if r < self.error_rate + self.slow_rate {
            let ms = (r * 1e6) as u64 % 200;
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        Ok(())
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({:?})", self.inner)
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.fault("put", location).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.fault("put", location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.fault("get", location).await?;
        *self
            .gets
            .lock()
            .unwrap()
            .entry(location.to_string())
            .or_default() += 1;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        if !self.refuse_deletes {
            return self.inner.delete_stream(locations);
        }
        locations
            .map(|l| {
                l.and_then(|path| {
                    Err(object_store::Error::PermissionDenied {
                        path: path.to_string(),
                        source: "403 AccessDenied: this key may not delete".into(),
                    })
                })
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let mut hook = self.before_list.lock().unwrap();
        let due = hook
            .as_ref()
            .is_some_and(|(p, _)| prefix.is_some_and(|l| l.as_ref().starts_with(p.as_str())));
        if due {
            let (_, then) = hook.take().expect("checked");
            then();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
