//! `Retry-After`: the server's hint of when to try again.

use http::header::{HeaderMap, RETRY_AFTER};
use std::time::{Duration, SystemTime};

/// The delay a response's `Retry-After` header asks for: delta-seconds (`120`) or an
/// HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`, and the two obsolete forms RFC 9110 still
/// accepts), measured from now. A date in the past is zero. A missing, repeated or malformed
/// header is `None`, never a panic.
///
/// ```
/// use http::HeaderMap;
/// use meshkit::http::retry_after;
/// use std::time::Duration;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("retry-after", "3".parse().unwrap());
/// assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
/// headers.insert("retry-after", "soon".parse().unwrap());
/// assert_eq!(retry_after(&headers), None);
/// ```
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    // The clock is read only for an HTTP-date.
    parse(headers, SystemTime::now)
}

/// [`retry_after`] with an explicit "now" for HTTP-dates (wall-clock time: a date names a
/// moment in UTC, not a point on tokio's clock).
pub fn retry_after_at(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    parse(headers, || now)
}

fn parse(headers: &HeaderMap, now: impl FnOnce() -> SystemTime) -> Option<Duration> {
    let mut values = headers.get_all(RETRY_AFTER).iter();
    let value = values.next()?;
    if values.next().is_some() {
        // Two hints that may disagree: trust neither.
        return None;
    }
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Delta-seconds; absurdly long values saturate rather than fail.
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now()).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(RETRY_AFTER, HeaderValue::from_bytes(value).unwrap());
        }
        map
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn delta_seconds_are_parsed() {
        assert_eq!(retry_after(&headers(&[b"0"])), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&headers(&[b" 120 "])),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(&headers(&[b"99999999999999999999999"])),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn http_dates_in_all_three_forms_are_parsed() {
        // 1994-11-06T08:49:37Z is 784111777 seconds after the epoch.
        let now = at(784_111_777 - 30);
        for form in [
            &b"Sun, 06 Nov 1994 08:49:37 GMT"[..],
            b"Sunday, 06-Nov-94 08:49:37 GMT",
            b"Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                retry_after_at(&headers(&[form]), now),
                Some(Duration::from_secs(30)),
                "{}",
                String::from_utf8_lossy(form)
            );
        }
    }

    #[test]
    fn a_date_in_the_past_means_now() {
        let headers = headers(&[b"Sun, 06 Nov 1994 08:49:37 GMT"]);
        assert_eq!(
            retry_after_at(&headers, at(2_000_000_000)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn malformed_missing_or_repeated_hints_are_ignored() {
        assert_eq!(retry_after(&HeaderMap::new()), None);
        for bad in [
            &b""[..],
            b"-1",
            b"1.5",
            b"soon",
            b"Sun, 32 Nov 1994 08:49:37 GMT",
            b"\xff",
        ] {
            assert_eq!(retry_after(&headers(&[bad])), None, "{bad:?}");
        }
        assert_eq!(retry_after(&headers(&[b"1", b"2"])), None);
    }

    proptest! {
        #[test]
        fn any_header_value_is_parsed_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                let mut map = HeaderMap::new();
                map.insert(RETRY_AFTER, value);
                let _ = retry_after(&map);
            }
        }
    }
}
