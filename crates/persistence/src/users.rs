//! [`UserRepository`] on SeaORM.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QuerySelect, Set,
    SqlErr,
};
use shop_domain::DomainError;
use shop_domain::auth::PasswordHash;
use shop_domain::ids::UserId;
use shop_domain::money::Money;
use shop_domain::ports::UserRepository;
use shop_domain::user::{ChargeAmount, User, UserName};

use crate::entity::user;
use crate::error::{Stored, db};

#[derive(Debug, Clone)]
pub struct SeaUserRepository {
    db: DatabaseConnection,
}

impl SeaUserRepository {
    #[must_use]
    pub const fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

/// One relative UPDATE: the addition happens in the row, so concurrent charges cannot lose one another, and the
/// limit guards the value being written (the domain's [`User::charge`] has decided already; this catches a
/// concurrent charge that landed after its read). Shared by the repository and the transaction.
pub(crate) async fn charge_on<C: ConnectionTrait>(
    conn: &C,
    id: UserId,
    amount: ChargeAmount,
    limit: Money,
    now: DateTime<Utc>,
) -> Result<Money, DomainError> {
    let add = amount.money().won();
    let updated = user::Entity::update_many()
        .col_expr(user::Column::Balance, Expr::col(user::Column::Balance).add(add))
        .col_expr(user::Column::Version, Expr::col(user::Column::Version).add(1))
        .col_expr(user::Column::UpdatedAt, Expr::value(now))
        .filter(user::Column::Id.eq(id.get()))
        .filter(user::Column::DeletedAt.is_null())
        .filter(user::Column::Balance.lte(limit.won() - add))
        .exec_with_returning(conn)
        .await
        .map_err(db)?;
    if let Some(row) = updated.into_iter().next() {
        return Money::new(row.balance).stored();
    }
    let exists = user::Entity::find_by_id(id.get())
        .filter(user::Column::DeletedAt.is_null())
        .one(conn)
        .await
        .map_err(db)?
        .is_some();
    Err(if exists { DomainError::BalanceLimitExceeded { limit } } else { DomainError::UserNotFound(id) })
}

pub(crate) fn to_user(m: user::Model) -> Result<User, DomainError> {
    Ok(User { id: UserId::new(m.id).stored()?, name: m.name, balance: Money::new(m.balance).stored()? })
}

#[async_trait]
impl UserRepository for SeaUserRepository {
    async fn existing(&self, ids: &[UserId]) -> Result<Vec<UserId>, DomainError> {
        let rows: Vec<i64> = user::Entity::find()
            .select_only()
            .column(user::Column::Id)
            .filter(user::Column::Id.is_in(ids.iter().map(|id| id.get())))
            .filter(user::Column::DeletedAt.is_null())
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(db)?;
        rows.into_iter().map(|id| UserId::new(id).stored()).collect()
    }

    async fn create(&self, name: &UserName, password: &PasswordHash, now: DateTime<Utc>) -> Result<User, DomainError> {
        let model = user::ActiveModel {
            name: Set(name.as_str().to_owned()),
            balance: Set(0),
            version: Set(0),
            password_hash: Set(Some(password.as_str().to_owned())),
            created_at: Set(now),
            updated_at: Set(now),
            deleted_at: Set(None),
            ..Default::default()
        }
        .insert(&self.db)
        .await
        .map_err(|e| match e.sql_err() {
            // `uq_users_live_name`: the one unique constraint a new user can break.
            Some(SqlErr::UniqueConstraintViolation(_)) => DomainError::UserNameTaken(name.as_str().to_owned()),
            _ => db(e),
        })?;
        to_user(model)
    }

    async fn find_by_name(&self, name: &UserName) -> Result<Option<(User, Option<PasswordHash>)>, DomainError> {
        let found = user::Entity::find()
            .filter(user::Column::Name.eq(name.as_str()))
            .filter(user::Column::DeletedAt.is_null())
            .one(&self.db)
            .await
            .map_err(db)?;
        found
            .map(|m| {
                let hash = m.password_hash.clone().map(PasswordHash::new);
                Ok((to_user(m)?, hash))
            })
            .transpose()
    }

    async fn find(&self, id: UserId) -> Result<Option<User>, DomainError> {
        user::Entity::find_by_id(id.get())
            .filter(user::Column::DeletedAt.is_null())
            .one(&self.db)
            .await
            .map_err(db)?
            .map(to_user)
            .transpose()
    }

    async fn charge(
        &self,
        id: UserId,
        amount: ChargeAmount,
        limit: Money,
        now: DateTime<Utc>,
    ) -> Result<Money, DomainError> {
        charge_on(&self.db, id, amount, limit, now).await
    }
}
