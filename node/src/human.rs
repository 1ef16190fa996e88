//! Numbers for people: sizes and durations as an operator reads them.

use std::time::Duration;

pub(crate) use ferry_engine::human::{bytes, count, counted};

/// `Duration` → `2.31 s` or `4 min 03 s`.
pub(crate) fn duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 { format!("{secs:.2} s") } else { format!("{} min {:02} s", d.as_secs() / 60, d.as_secs() % 60) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(duration(Duration::from_millis(2310)), "2.31 s");
        assert_eq!(duration(Duration::from_secs(243)), "4 min 03 s");
    }
}
