//! Certificate lifetimes, checked when a process starts.
//!
//! A process looks at every certificate it is about to present (its own) or trust (the CA)
//! before it opens a socket. One that has expired, or is not valid yet, is an error: every
//! peer would refuse it anyway, with a far less helpful message. One that expires within
//! [`WARN_AHEAD_DAYS`] is a warning, so operators renew before a federation stops. Running
//! processes do not recheck; a restart does.

use std::path::Path;

use rustls::pki_types::CertificateDer;
use time::{OffsetDateTime, UtcOffset};

use crate::Error;

/// How many days before it expires a certificate is warned about at start.
pub const WARN_AHEAD_DAYS: i64 = 30;

/// When a certificate may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// The first moment it is valid.
    pub not_before: OffsetDateTime,
    /// The last moment it is valid.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// The validity period written in `certificate`, or `None` if it cannot be parsed.
    pub fn of(certificate: &CertificateDer<'_>) -> Option<Self> {
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate).ok()?;
        let validity = parsed.validity();
        Some(Validity {
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
        })
    }
}

/// Checks a certificate this process is about to present or trust.
///
/// `what` names it for a person ("this node's certificate", "the federation's CA"), and
/// `renew` says how to get a new one. Returns a warning when it expires within
/// [`WARN_AHEAD_DAYS`] of `now`.
///
/// # Errors
/// [`Error::Certificate`] when it is expired, not valid yet, or unreadable.
pub fn check(
    what: &str,
    path: &Path,
    certificate: &CertificateDer<'_>,
    now: OffsetDateTime,
    renew: &str,
) -> Result<Option<String>, Error> {
    let refuse = |message: String| Error::Certificate {
        path: path.to_path_buf(),
        message,
    };
    let Some(validity) = Validity::of(certificate) else {
        return Err(refuse(format!(
            "{what} is not a readable X.509 certificate"
        )));
    };

    if now > validity.not_after {
        return Err(refuse(format!(
            "{what} expired on {} ({} days ago); {renew}",
            moment(validity.not_after),
            (now - validity.not_after).whole_days()
        )));
    }
    if now < validity.not_before {
        return Err(refuse(format!(
            "{what} is not valid until {}; check this machine's clock (it reads {})",
            moment(validity.not_before),
            moment(now)
        )));
    }
    let left = validity.not_after - now;
    Ok((left.whole_days() < WARN_AHEAD_DAYS).then(|| {
        format!(
            "{what} {} expires on {}, in {} days; {renew}",
            path.display(),
            moment(validity.not_after),
            left.whole_days()
        )
    }))
}

/// A moment as a person reads it, in UTC to the minute.
pub fn moment(at: OffsetDateTime) -> String {
    let at = at.to_offset(UtcOffset::UTC);
    format!("{} {:02}:{:02} UTC", at.date(), at.hour(), at.minute())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn certificate(
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn at(year: i32, month: u8, day: u8) -> OffsetDateTime {
        rcgen::date_time_ymd(year, month, day)
    }

    const RENEW: &str = "issue a new one";

    #[test]
    fn a_certificate_far_from_expiry_passes_silently() {
        let cert = certificate(at(2026, 1, 1), at(2028, 1, 1));
        let found = check("the CA", Path::new("ca.crt"), &cert, at(2027, 1, 1), RENEW).unwrap();
        assert_eq!(found, None);
    }

    #[test]
    fn a_certificate_expiring_within_thirty_days_is_warned_about() {
        let cert = certificate(at(2026, 1, 1), at(2027, 1, 20));
        let warning = check("the CA", Path::new("ca.crt"), &cert, at(2027, 1, 1), RENEW)
            .unwrap()
            .expect("a warning");
        assert!(
            warning.contains("expires on 2027-01-20 00:00 UTC, in 19 days; issue a new one"),
            "{warning}"
        );
    }

    #[test]
    fn an_expired_certificate_is_an_error_that_says_when_and_what_to_do() {
        let cert = certificate(at(2026, 1, 1), at(2027, 1, 1));
        let now = at(2027, 1, 1) + Duration::days(3);
        let err = check(
            "this node's certificate",
            Path::new("n.crt"),
            &cert,
            now,
            RENEW,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("this node's certificate expired on 2027-01-01 00:00 UTC (3 days ago)")
                && err.contains(RENEW),
            "{err}"
        );
    }

    #[test]
    fn a_certificate_from_the_future_points_at_the_clock() {
        let cert = certificate(at(2027, 6, 1), at(2028, 1, 1));
        let err = check("the CA", Path::new("ca.crt"), &cert, at(2027, 1, 1), RENEW)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not valid until 2027-06-01") && err.contains("clock"),
            "{err}"
        );
    }
}
