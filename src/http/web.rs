//! The web page every node serves at `/`: a prompt form, live progress of
//! the browser's jobs, a gallery of results and a self-updating cluster view.
//!
//! Three static files embedded in the binary (no build step, no CDN, nothing
//! to deploy beside the node). They hold no data: everything they show comes
//! from the public JSON API, called by the page's script with the visitor's
//! API key when the cluster has keys. So `/` and `/assets/*` are routed
//! outside the API-key layer (like `/metrics`), and a visitor without a key
//! still gets the page that asks for one.
//!
//! Every answer carries a strict `Content-Security-Policy` (same origin only;
//! `blob:` images for results fetched with a key), `nosniff`, and an `ETag`
//! with `Cache-Control: no-cache`: browsers revalidate (a cheap 304), so a
//! node upgraded in place never serves a stale script.

use std::sync::{Arc, LazyLock};

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::node::app::App;

/// Only this origin, for everything; no inline script or style.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'";

/// One embedded file: its bytes, content type and entity tag.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: HeaderValue,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Asset {
        let digest = Sha256::digest(body.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Asset { body, content_type, etag: HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a header value") }
    }
}

static INDEX: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("web/index.html"), "text/html; charset=utf-8"));
static APP_JS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("web/app.js"), "text/javascript; charset=utf-8"));
static STYLE_CSS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("web/style.css"), "text/css; charset=utf-8"));

pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/", get(|h: HeaderMap| async move { serve(&INDEX, &h) })).route("/assets/{name}", get(asset))
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match name.as_str() {
        "app.js" => serve(&APP_JS, &headers),
        "style.css" => serve(&STYLE_CSS, &headers),
        _ => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such asset").into_response(),
    }
}

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii() == asset.etag.as_bytes()));
    let mut resp = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { asset.body.into_response() };
    let h = resp.headers_mut();
    if !fresh {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    }
    h.insert(header::ETAG, asset.etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_only_embedded_assets() {
        for path in ["/assets/app.js", "/assets/style.css"] {
            assert!(INDEX.body.contains(path), "index.html does not load {path}");
        }
        for text in [INDEX.body, APP_JS.body, STYLE_CSS.body] {
            assert!(!text.contains("http://") && !text.contains("https://"), "an external origin in an asset");
        }
    }

    #[test]
    fn a_matching_etag_gets_not_modified() {
        let mut h = HeaderMap::new();
        assert_eq!(serve(&APP_JS, &h).status(), StatusCode::OK);
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"0000\", \"1111\""));
        assert_eq!(serve(&APP_JS, &h).status(), StatusCode::OK);
        let both = format!("\"0000\", {}", APP_JS.etag.to_str().unwrap());
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&both).unwrap());
        let resp = serve(&APP_JS, &h);
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
        assert!(resp.headers().contains_key(header::CONTENT_SECURITY_POLICY));
    }
}
