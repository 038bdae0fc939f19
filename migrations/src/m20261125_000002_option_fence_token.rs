//! `product_options.fence_token`: the newest fencing token a stock write was accepted under, so that a holder of
//! a Redis lock that expired under it (paused past its lease) cannot overwrite a newer holder's stock.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ProductOptions::Table)
                    .add_column(ColumnDef::new(ProductOptions::FenceToken).big_integer().not_null().default(0))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(Table::alter().table(ProductOptions::Table).drop_column(ProductOptions::FenceToken).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum ProductOptions {
    Table,
    FenceToken,
}
