-- Corrections after finalization (docs/MONTH_CLOSE.md): over-billing of a period whose
-- Stripe invoice is finalized becomes a credit note against that invoice, outbox kind
-- 'credit_note' (amount_cents negative, so the pushed sums per label stay right).
-- The kind list is extended in place, keeping whatever earlier migrations allow.
DO $$
DECLARE
    def text;
BEGIN
    SELECT pg_get_constraintdef(oid) INTO def FROM pg_constraint
     WHERE conrelid = 'billing.stripe_outbox'::regclass AND conname = 'stripe_outbox_kind_check';
    IF def IS NULL OR def LIKE '%credit_note%' THEN
        RETURN;
    END IF;
    ALTER TABLE billing.stripe_outbox DROP CONSTRAINT stripe_outbox_kind_check;
    EXECUTE 'ALTER TABLE billing.stripe_outbox ADD CONSTRAINT stripe_outbox_kind_check '
            || replace(def, 'ARRAY[', 'ARRAY[''credit_note''::text, ');
END
$$;

ALTER TABLE billing.stripe_outbox ADD CONSTRAINT stripe_outbox_credit_note_check
    CHECK (kind <> 'credit_note' OR (amount_cents < 0 AND currency IS NOT NULL AND metric IS NOT NULL));
