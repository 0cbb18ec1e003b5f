//! Blob storage (release bundles) through the `object_store` crate: a local
//! directory by default, an S3-compatible bucket in production. Keys are
//! content-addressed (`bundles/<sha256>.kxb`), so a bundle uploaded twice,
//! or to two organisations, is stored once. With S3, downloads are
//! redirected to presigned URLs (the bucket or a CDN serves the bytes).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, WriteMultipart};
use tokio::io::AsyncReadExt;

/// Where blobs live.
#[derive(Debug, Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn Signer>>,
}

/// Where an S3-compatible bucket is and how to reach it. Unset values come
/// from the usual `AWS_*` environment variables.
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    /// Bucket name.
    pub bucket: String,
    /// Endpoint URL for S3-compatible servers (MinIO, Ceph, moto...).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Allow `http://` endpoints.
    pub allow_http: bool,
}

/// The key of a bundle with this SHA-256.
pub fn bundle_key(sha256_hex: &str) -> String {
    format!("bundles/{sha256_hex}.kxb")
}

impl Blobs {
    /// A local directory (created if missing).
    pub fn local(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("unable to create the blob directory {}", dir.display()))?;
        let fs = LocalFileSystem::new_with_prefix(dir)
            .with_context(|| format!("unable to open the blob directory {}", dir.display()))?;
        Ok(Blobs {
            store: Arc::new(fs),
            signer: None,
        })
    }

    /// An S3-compatible bucket (path-style requests).
    pub fn s3(settings: &S3Settings) -> Result<Self> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&settings.bucket)
            .with_allow_http(settings.allow_http)
            .with_virtual_hosted_style_request(false);
        if let Some(v) = &settings.endpoint {
            b = b.with_endpoint(v);
        }
        if let Some(v) = &settings.region {
            b = b.with_region(v);
        }
        if let Some(v) = &settings.access_key_id {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = &settings.secret_access_key {
            b = b.with_secret_access_key(v);
        }
        let s3 = Arc::new(
            b.build()
                .with_context(|| format!("unable to configure S3 bucket {}", settings.bucket))?,
        );
        Ok(Blobs {
            store: s3.clone(),
            signer: Some(s3),
        })
    }

    /// A presigned GET URL for `key`, valid `ttl`, when the store is S3.
    pub async fn presigned_get(
        &self,
        key: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<String>> {
        match &self.signer {
            None => Ok(None),
            Some(signer) => Ok(Some(
                signer
                    .signed_url(axum::http::Method::GET, &ObjectPath::from(key), ttl)
                    .await?
                    .to_string(),
            )),
        }
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Copies a local file to `key`, streaming it in parts.
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<()> {
        let upload = self.store.put_multipart(&ObjectPath::from(key)).await?;
        let mut writer = WriteMultipart::new(upload);
        let mut f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("unable to open {}", file.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await?;
        Ok(())
    }

    /// Streams `range` (or all) of `key`.
    pub async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<BoxStream<'static, object_store::Result<Bytes>>> {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let result = self.store.get_opts(&ObjectPath::from(key), options).await?;
        Ok(result.into_stream())
    }

    /// Removes `key` (missing is fine).
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
