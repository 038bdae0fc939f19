//! [`IdempotencyStore`] on SeaORM. Every step is one conditional statement, so claims race safely across
//! instances without any lock held between requests.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, Set};
use shop_domain::DomainError;
use shop_domain::idempotency::{ClaimOutcome, IdempotencyClaim, IdempotencyKey, StoredResponse};
use shop_domain::ids::UserId;
use shop_domain::ports::IdempotencyStore;

use crate::entity::idempotency_key as key_row;
use crate::error::db;

const IN_PROGRESS: &str = "IN_PROGRESS";
const COMPLETED: &str = "COMPLETED";

#[derive(Debug, Clone)]
pub struct SeaIdempotencyStore {
    db: DatabaseConnection,
}

impl SeaIdempotencyStore {
    #[must_use]
    pub const fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    async fn find(&self, user_id: UserId, key: &IdempotencyKey) -> Result<Option<key_row::Model>, DomainError> {
        key_row::Entity::find()
            .filter(key_row::Column::UserId.eq(user_id.get()))
            .filter(key_row::Column::IdemKey.eq(key.as_str()))
            .one(&self.db)
            .await
            .map_err(db)
    }

    /// Takes over `row` (expired, or its holder's lease ran out) if nobody else did first.
    async fn take_over(
        &self,
        row: &key_row::Model,
        request_hash: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<bool, DomainError> {
        let result = key_row::Entity::update_many()
            .col_expr(key_row::Column::RequestHash, Expr::value(request_hash))
            .col_expr(key_row::Column::State, Expr::value(IN_PROGRESS))
            .col_expr(key_row::Column::ClaimToken, Expr::col(key_row::Column::ClaimToken).add(1))
            .col_expr(key_row::Column::LockedUntil, Expr::value(lease_until))
            .col_expr(key_row::Column::ResponseStatus, Expr::value(Option::<i32>::None))
            .col_expr(key_row::Column::ResponseBody, Expr::value(Option::<String>::None))
            .col_expr(key_row::Column::CreatedAt, Expr::value(now))
            .col_expr(key_row::Column::ExpiresAt, Expr::value(expires_at))
            .filter(key_row::Column::Id.eq(row.id))
            .filter(key_row::Column::ClaimToken.eq(row.claim_token))
            .exec(&self.db)
            .await
            .map_err(db)?;
        Ok(result.rows_affected == 1)
    }
}

#[async_trait]
impl IdempotencyStore for SeaIdempotencyStore {
    async fn claim(
        &self,
        user_id: UserId,
        key: &IdempotencyKey,
        request_hash: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<ClaimOutcome, DomainError> {
        let claimed = |row: &key_row::Model, token: i64| {
            ClaimOutcome::Claimed(IdempotencyClaim { id: row.id, user_id, key: key.clone(), token })
        };
        // A few rounds at most: each lost round means another request changed the row, and it cannot do that
        // forever (it completes, or releases, or its lease runs out).
        for _ in 0..5 {
            let inserted = key_row::Entity::insert(key_row::ActiveModel {
                user_id: Set(user_id.get()),
                idem_key: Set(key.as_str().to_owned()),
                request_hash: Set(request_hash.to_owned()),
                state: Set(IN_PROGRESS.to_owned()),
                claim_token: Set(1),
                locked_until: Set(lease_until),
                response_status: Set(None),
                response_body: Set(None),
                created_at: Set(now),
                expires_at: Set(expires_at),
                ..Default::default()
            })
            .on_conflict(
                OnConflict::columns([key_row::Column::UserId, key_row::Column::IdemKey]).do_nothing().to_owned(),
            )
            .exec_without_returning(&self.db)
            .await
            .map_err(db)?;
            let Some(row) = self.find(user_id, key).await? else { continue };
            if inserted == 1 {
                return Ok(claimed(&row, row.claim_token));
            }
            if row.expires_at <= now {
                // An expired key acts anew.
                if self.take_over(&row, request_hash, now, lease_until, expires_at).await? {
                    return Ok(claimed(&row, row.claim_token + 1));
                }
                continue;
            }
            if row.request_hash != request_hash {
                return Ok(ClaimOutcome::Mismatch);
            }
            if row.state == COMPLETED {
                let status = row.response_status.and_then(|s| u16::try_from(s).ok()).unwrap_or(500);
                return Ok(ClaimOutcome::Completed(StoredResponse {
                    status,
                    body: row.response_body.unwrap_or_default(),
                }));
            }
            if row.locked_until > now {
                return Ok(ClaimOutcome::InUse);
            }
            // Its holder's lease ran out: it died without completing, and its effect never committed.
            if self.take_over(&row, request_hash, now, lease_until, expires_at).await? {
                return Ok(claimed(&row, row.claim_token + 1));
            }
        }
        Ok(ClaimOutcome::InUse)
    }

    async fn release(&self, claim: &IdempotencyClaim) -> Result<(), DomainError> {
        key_row::Entity::delete_many()
            .filter(key_row::Column::Id.eq(claim.id))
            .filter(key_row::Column::ClaimToken.eq(claim.token))
            .filter(key_row::Column::State.eq(IN_PROGRESS))
            .exec(&self.db)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, DomainError> {
        let result = key_row::Entity::delete_many()
            .filter(key_row::Column::ExpiresAt.lt(now))
            .exec(&self.db)
            .await
            .map_err(db)?;
        Ok(result.rows_affected)
    }
}

/// Completes a claim with its response, inside the caller's transaction; `false` when the claim is no longer
/// this one or is already completed.
pub(crate) async fn record_response<C: ConnectionTrait>(
    conn: &C,
    claim: &IdempotencyClaim,
    response: &StoredResponse,
    now: DateTime<Utc>,
) -> Result<bool, DomainError> {
    let result = key_row::Entity::update_many()
        .col_expr(key_row::Column::State, Expr::value(COMPLETED))
        .col_expr(key_row::Column::ResponseStatus, Expr::value(Some(i32::from(response.status))))
        .col_expr(key_row::Column::ResponseBody, Expr::value(Some(response.body.clone())))
        .col_expr(key_row::Column::LockedUntil, Expr::value(now))
        .filter(key_row::Column::Id.eq(claim.id))
        .filter(key_row::Column::ClaimToken.eq(claim.token))
        .filter(key_row::Column::State.eq(IN_PROGRESS))
        .exec(conn)
        .await
        .map_err(db)?;
    Ok(result.rows_affected == 1)
}
