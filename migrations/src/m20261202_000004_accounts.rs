//! Accounts and sessions: a password hash on each user and one live user per name; the refresh tokens of signed-in
//! sessions (stored only as hashes, grouped in families that rotate); the secrets an embedded deployment keeps for
//! itself; and the index that counts a user's unpaid orders.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_pk_auto, string_len, text, text_null, timestamp_with_time_zone, timestamp_with_time_zone_null,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The Argon2id hash in PHC format; users made before accounts existed have none and cannot sign in.
        manager
            .alter_table(Table::alter().table(Users::Table).add_column(text_null(Users::PasswordHash)).to_owned())
            .await?;
        // A name is the sign-in handle: one live user per name (a soft-deleted user frees it).
        manager
            .create_index(
                Index::create()
                    .name("uq_users_live_name")
                    .table(Users::Table)
                    .col(Users::Name)
                    .unique()
                    .and_where(Expr::col(Users::DeletedAt).is_null())
                    .to_owned(),
            )
            .await?;
        // The cap on what one user holds unpaid: WHERE user_id IN (...) AND status = 'PENDING_PAYMENT'.
        manager
            .create_index(
                Index::create()
                    .name("idx_orders_pending_user")
                    .table(Orders::Table)
                    .col(Orders::UserId)
                    .and_where(Expr::col(Orders::Status).eq("PENDING_PAYMENT"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RefreshTokens::Table)
                    .col(big_pk_auto(RefreshTokens::Id))
                    .col(big_integer(RefreshTokens::UserId))
                    // Every token a sign-in begins and its rotations share a family: reusing a retired token
                    // revokes all of them.
                    .col(string_len(RefreshTokens::Family, 36))
                    // SHA-256 of the opaque token, hex: a stolen database does not hand out sessions.
                    .col(string_len(RefreshTokens::TokenHash, 64))
                    .col(timestamp_with_time_zone(RefreshTokens::CreatedAt))
                    .col(timestamp_with_time_zone(RefreshTokens::ExpiresAt))
                    .col(timestamp_with_time_zone_null(RefreshTokens::RetiredAt))
                    .col(timestamp_with_time_zone_null(RefreshTokens::RevokedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_refresh_tokens_user")
                            .from(RefreshTokens::Table, RefreshTokens::UserId)
                            .to(Users::Table, Users::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_refresh_tokens_hash")
                    .table(RefreshTokens::Table)
                    .col(RefreshTokens::TokenHash)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // Revoking a family; the purge of expired tokens.
        manager
            .create_index(
                Index::create()
                    .name("idx_refresh_tokens_family")
                    .table(RefreshTokens::Table)
                    .col(RefreshTokens::Family)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_refresh_tokens_expires_at")
                    .table(RefreshTokens::Table)
                    .col(RefreshTokens::ExpiresAt)
                    .to_owned(),
            )
            .await?;
        // What an embedded deployment generates for itself once and keeps across restarts (its token-signing
        // secret); a deployment on PostgreSQL is given its secrets instead.
        manager
            .create_table(
                Table::create()
                    .table(AppSecrets::Table)
                    .col(string_len(AppSecrets::Name, 64).primary_key())
                    .col(text(AppSecrets::Value))
                    .col(timestamp_with_time_zone(AppSecrets::CreatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(AppSecrets::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(RefreshTokens::Table).to_owned()).await?;
        manager.drop_index(Index::drop().name("idx_orders_pending_user").table(Orders::Table).to_owned()).await?;
        manager.drop_index(Index::drop().name("uq_users_live_name").table(Users::Table).to_owned()).await?;
        manager.alter_table(Table::alter().table(Users::Table).drop_column(Users::PasswordHash).to_owned()).await
    }
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Name,
    PasswordHash,
    DeletedAt,
}

#[derive(DeriveIden)]
enum Orders {
    Table,
    UserId,
    Status,
}

#[derive(DeriveIden)]
enum RefreshTokens {
    Table,
    Id,
    UserId,
    Family,
    TokenHash,
    CreatedAt,
    ExpiresAt,
    RetiredAt,
    RevokedAt,
}

#[derive(DeriveIden)]
enum AppSecrets {
    Table,
    Name,
    Value,
    CreatedAt,
}
