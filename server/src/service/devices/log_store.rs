//! The cap on what one device's log may hold (`[limits]
//! device-log-max-lines`, `device-log-max-bytes`). A device's stored log is
//! a ring: a batch that would go over a cap first deletes that device's
//! oldest lines, so a device flooding its log bounds its own storage and
//! nobody else's, and the newest lines are kept. A batch that alone is
//! over a cap cannot fit and is refused ([`Error::OverLimit`], 413).

use sqlx::Row;

use crate::AppState;
use crate::service::{Error, Result};

/// Oldest lines read per round while making room.
const PAGE: i64 = 500;

/// Makes room in device `pk`'s log for `lines` more lines of `bytes`
/// message bytes, inside the transaction that stores them.
pub async fn make_room(
    conn: &mut sqlx::AnyConnection,
    state: &AppState,
    pk: &str,
    lines: u64,
    bytes: u64,
) -> Result<()> {
    let limits = &state.config.limits;
    if lines > limits.device_log_max_lines {
        return Err(Error::OverLimit(format!(
            "log batch: {lines} lines, a device keeps at most {} ([limits] device-log-max-lines)",
            limits.device_log_max_lines
        )));
    }
    if bytes > limits.device_log_max_bytes {
        return Err(Error::OverLimit(format!(
            "log batch: {bytes} bytes of messages, a device keeps at most {} ([limits] device-log-max-bytes)",
            limits.device_log_max_bytes
        )));
    }
    let row = sqlx::query(
        "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(bytes), 0) AS BIGINT) AS b FROM device_logs WHERE device_pk = $1",
    )
    .bind(pk)
    .fetch_one(&mut *conn)
    .await?;
    let stored_lines = u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0);
    let stored_bytes = u64::try_from(row.try_get::<i64, _>("b")?).unwrap_or(0);
    let mut free_lines = (stored_lines + lines).saturating_sub(limits.device_log_max_lines);
    let mut free_bytes = (stored_bytes + bytes).saturating_sub(limits.device_log_max_bytes);
    let mut deleted = 0u64;
    while free_lines > 0 || free_bytes > 0 {
        let oldest = sqlx::query(
            "SELECT id, bytes FROM device_logs WHERE device_pk = $1 ORDER BY at, id LIMIT $2",
        )
        .bind(pk)
        .bind(PAGE)
        .fetch_all(&mut *conn)
        .await?;
        if oldest.is_empty() {
            break;
        }
        let mut ids = Vec::new();
        for row in &oldest {
            if free_lines == 0 && free_bytes == 0 {
                break;
            }
            let size = u64::try_from(row.try_get::<i64, _>("bytes")?).unwrap_or(0);
            ids.push(row.try_get::<String, _>("id")?);
            free_lines = free_lines.saturating_sub(1);
            free_bytes = free_bytes.saturating_sub(size);
        }
        let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "DELETE FROM device_logs WHERE id IN ({})",
            placeholders.join(", ")
        );
        let mut delete = sqlx::query(&sql);
        for id in &ids {
            delete = delete.bind(id);
        }
        deleted += delete.execute(&mut *conn).await?.rows_affected();
    }
    if deleted > 0 {
        tracing::info!(device = %pk, deleted, "device log at its cap: oldest lines deleted");
    }
    Ok(())
}
