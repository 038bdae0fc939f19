//! [`SessionStore`] on SeaORM: refresh-token digests, rotated in one transaction each.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, Set, TransactionTrait, prelude::DateTimeUtc};
use shop_domain::DomainError;
use shop_domain::auth::{Rotation, TokenDigest};
use shop_domain::ids::UserId;
use shop_domain::ports::SessionStore;

use crate::entity::{app_secret, refresh_token as token};
use crate::error::{Stored, db};

#[derive(Debug, Clone)]
pub struct SeaSessionStore {
    db: DatabaseConnection,
}

impl SeaSessionStore {
    #[must_use]
    pub const fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

fn row(user: i64, family: &str, digest: &TokenDigest, expires_at: DateTimeUtc, now: DateTimeUtc) -> token::ActiveModel {
    token::ActiveModel {
        user_id: Set(user),
        family: Set(family.to_owned()),
        token_hash: Set(digest.0.clone()),
        created_at: Set(now),
        expires_at: Set(expires_at),
        retired_at: Set(None),
        revoked_at: Set(None),
        ..Default::default()
    }
}

#[async_trait]
impl SessionStore for SeaSessionStore {
    async fn begin(
        &self,
        user_id: UserId,
        digest: &TokenDigest,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        let family = uuid::Uuid::new_v4().to_string();
        token::Entity::insert(row(user_id.get(), &family, digest, expires_at, now))
            .exec_without_returning(&self.db)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn rotate(
        &self,
        old: &TokenDigest,
        new: &TokenDigest,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Rotation, DomainError> {
        let tx = self.db.begin().await.map_err(db)?;
        // Retire it only if it is live: of two concurrent rotations of one token, one retires it and the other
        // finds it retired.
        let retired = token::Entity::update_many()
            .col_expr(token::Column::RetiredAt, Expr::value(Some(now)))
            .filter(token::Column::TokenHash.eq(old.0.as_str()))
            .filter(token::Column::RetiredAt.is_null())
            .filter(token::Column::RevokedAt.is_null())
            .filter(token::Column::ExpiresAt.gt(now))
            .exec_with_returning(&tx)
            .await
            .map_err(db)?;
        if let Some(live) = retired.into_iter().next() {
            token::Entity::insert(row(live.user_id, &live.family, new, expires_at, now))
                .exec_without_returning(&tx)
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            return Ok(Rotation::Rotated { user_id: UserId::new(live.user_id).stored()? });
        }
        let known =
            token::Entity::find().filter(token::Column::TokenHash.eq(old.0.as_str())).one(&tx).await.map_err(db)?;
        let rotation = match known {
            Some(t) if t.retired_at.is_some() && t.revoked_at.is_none() => {
                // A retired token again: whoever holds it copied it. The family goes, newest token included.
                revoke_family(&tx, &t.family, now).await?;
                Rotation::Reused
            }
            _ => Rotation::Unknown,
        };
        tx.commit().await.map_err(db)?;
        Ok(rotation)
    }

    async fn revoke(&self, digest: &TokenDigest, now: DateTime<Utc>) -> Result<bool, DomainError> {
        let live = token::Entity::find()
            .filter(token::Column::TokenHash.eq(digest.0.as_str()))
            .filter(token::Column::RetiredAt.is_null())
            .filter(token::Column::RevokedAt.is_null())
            .filter(token::Column::ExpiresAt.gt(now))
            .one(&self.db)
            .await
            .map_err(db)?;
        let Some(live) = live else { return Ok(false) };
        revoke_family(&self.db, &live.family, now).await?;
        Ok(true)
    }

    async fn purge_expired(&self, now: DateTime<Utc>) -> Result<u64, DomainError> {
        let purged =
            token::Entity::delete_many().filter(token::Column::ExpiresAt.lt(now)).exec(&self.db).await.map_err(db)?;
        Ok(purged.rows_affected)
    }
}

async fn revoke_family<C: sea_orm::ConnectionTrait>(
    conn: &C,
    family: &str,
    now: DateTime<Utc>,
) -> Result<(), DomainError> {
    token::Entity::update_many()
        .col_expr(token::Column::RevokedAt, Expr::value(Some(now)))
        .filter(token::Column::Family.eq(family))
        .filter(token::Column::RevokedAt.is_null())
        .exec(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// The secret named `name` this database keeps for its deployment, made by `make` the first time. Instances
/// started together agree: the first insert wins and everyone reads it back.
///
/// # Errors
/// The driver's error.
pub async fn stored_secret(
    conn: &DatabaseConnection,
    name: &str,
    make: impl FnOnce() -> String,
    now: DateTime<Utc>,
) -> Result<String, sea_orm::DbErr> {
    app_secret::Entity::insert(app_secret::ActiveModel {
        name: Set(name.to_owned()),
        value: Set(make()),
        created_at: Set(now),
    })
    .on_conflict(OnConflict::column(app_secret::Column::Name).do_nothing().to_owned())
    .exec_without_returning(conn)
    .await?;
    let kept = app_secret::Entity::find_by_id(name.to_owned()).one(conn).await?;
    kept.map(|s| s.value).ok_or_else(|| sea_orm::DbErr::RecordNotFound(format!("secret {name}")))
}
