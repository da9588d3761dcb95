import json

from rest_framework import serializers

from marketplace import shown_text
from marketplace.serializers import MAX_AMOUNT, AtomicAmountField, StrictIntegerField, StrictSerializer



def _signature(**kwargs):
    return serializers.RegexField(r"^0x[0-9a-fA-F]{130}$", help_text="65-byte signature, 0x-hex (r ‖ s ‖ v).",
                                  **kwargs)


class TypedDataSerializer(serializers.Serializer):
    types = serializers.DictField()
    primaryType = serializers.CharField()
    domain = serializers.DictField()
    message = serializers.DictField()


class TokenDomainSerializer(serializers.Serializer):
    name = serializers.CharField()
    version = serializers.CharField()


class FeeScheduleSerializer(serializers.Serializer):
    percent_bps = serializers.IntegerField()
    fixed_atomic = AtomicAmountField()
    minimum_atomic = AtomicAmountField()


class NetworkConfigSerializer(serializers.Serializer):
    chain_id = serializers.IntegerField()
    escrow_address = serializers.CharField()
    token_address = serializers.CharField()
    token_domain = TokenDomainSerializer(help_text="The token's EIP-712 domain, read from the token (EIP-5267).")
    receipt_signer = serializers.CharField(help_text="The key that signs usage receipts.")
    retired_receipt_signers = serializers.ListField(
        child=serializers.CharField(), help_text="Receipt signers rotated out: an escrow activated under one keeps it, "
                                                 "and its receipts are signed by it.")
    gas_wallet = serializers.CharField(help_text="The relayer: spender of a direct purchase's fee permit.")
    fee_schedule = FeeScheduleSerializer()
    escrow_deployment_block = serializers.IntegerField(help_text="Where reads of the escrow's events start.")


class ActivationPackageSerializer(serializers.Serializer):
    agreement_id = serializers.UUIDField()
    onchain_id = serializers.CharField()
    chain_id = serializers.IntegerField()
    escrow_contract = serializers.CharField()
    token_address = serializers.CharField()
    deposit_amount_atomic = AtomicAmountField()
    infra_fee_atomic = AtomicAmountField()
    deadline = StrictIntegerField(help_text="Unix time (chain clock) until which the signatures are valid.")
    intent = TypedDataSerializer(help_text="EIP-712 ActivationIntent to sign with the buyer wallet.")
    escrow_permit = TypedDataSerializer(help_text="The one EIP-2612 permit, for the deposit plus the infra fee.")
    intent_nonce_round = StrictIntegerField(
        required=False, min_value=1,
        help_text="Present once the buyer cancelled the agreement's first intent nonce on-chain: the intent's nonce is "
                  "keccak256(\"activation\" ‖ onchain_id ‖ uint256 round) (sdk.activation.activation_intent_nonce).")


class SignedPermitSerializer(StrictSerializer):
    value = AtomicAmountField()
    nonce = StrictIntegerField(min_value=0)
    deadline = StrictIntegerField(min_value=0, max_value=MAX_AMOUNT)  # a uint256 of the signed permit
    signature = _signature()


class ActivateEscrowSerializer(StrictSerializer):
    intent_signature = _signature()
    deadline = StrictIntegerField(min_value=0, max_value=MAX_AMOUNT,
                                  help_text="The `deadline` of the package that was signed.")
    escrow_permit = SignedPermitSerializer(help_text="The signed permit of the deposit plus the infra fee.")


class ChainTransactionSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    purpose = serializers.CharField()
    status = serializers.CharField()
    nonce = serializers.IntegerField(allow_null=True)
    tx_hash = serializers.CharField(allow_blank=True, help_text="The mined hash, else the latest attempt's.")
    tx_hashes = serializers.ListField(child=serializers.CharField(), help_text="Every hash ever broadcast.")
    block_number = serializers.IntegerField(allow_null=True)
    confirmations = serializers.IntegerField()
    confirmations_required = serializers.IntegerField()
    failure_reason = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()


class ActivationAcceptedSerializer(serializers.Serializer):
    agreement_id = serializers.UUIDField()
    status = serializers.CharField()
    transaction = ChainTransactionSerializer()


class PaymentAuthorizationCancelPackageSerializer(serializers.Serializer):
    agreement_id = serializers.UUIDField()
    cancel_authorization = TypedDataSerializer(
        help_text="EIP-712 CancelAuthorization (EIP-3009) of the purchase's x402 authorization, to sign with the buyer "
                  "wallet: authorizer the buyer, nonce the authorization's, in the token's domain.")


class PaymentAuthorizationCancelSerializer(StrictSerializer):
    signature = _signature()


class PaymentAuthorizationCancelAcceptedSerializer(serializers.Serializer):
    agreement_id = serializers.UUIDField()
    transaction = ChainTransactionSerializer(help_text="The relayer's cancelAuthorization; confirmed, the agreement "
                                                       "names it (payment_authorization_cancel_tx_hash).")


class EscrowStatusSerializer(serializers.Serializer):
    agreement_id = serializers.UUIDField()
    onchain_id = serializers.CharField()
    status = serializers.CharField()
    escrow_status = serializers.CharField(help_text="As on the agreement (the Pægents SDK reads it here).")
    settlement_status = serializers.CharField(help_text="= status (the Pægents SDK polls it until `settled`).")
    chain_id = serializers.IntegerField()
    escrow_contract = serializers.CharField()
    deposit_amount_atomic = AtomicAmountField()
    deposited_atomic = AtomicAmountField(help_text="What the escrow holds for this agreement per our records.")
    used_atomic = AtomicAmountField()
    reserved_atomic = AtomicAmountField()
    remaining_atomic = AtomicAmountField()
    infra_fee_atomic = AtomicAmountField()
    activation_tx_hash = serializers.CharField(allow_blank=True)
    challenge_deadline = serializers.DateTimeField(allow_null=True)
    transactions = ChainTransactionSerializer(many=True)
    backend_fault = serializers.BooleanField(help_text="Submitting without a transaction hash for too long.")
    onchain = serializers.DictField(allow_null=True, help_text="The contract's record, with ?verify=true.")


EVIDENCE_MAX_CHARACTERS = 5000


def _shown_prose(value: str, *, field: str) -> str:
    """A dispute's reason (the agreement's `status_reason`, which the seller reads) or evidence (the arbiter's), as
    written: control and invisible format characters are refused (`unsafe_characters`)."""
    shown_text.refuse_unsafe(value, field=field, prose=True)
    return value


class DisputeSerializer(StrictSerializer):
    """The Pægents SDK's dispute (`reason`, `evidence`), plus what the on-chain challenge needs: the buyer wallet's
    signature of the Challenge typed data (GET .../challenge-package)."""

    reason = serializers.CharField(min_length=10, max_length=500)
    evidence = serializers.JSONField(required=False, help_text="Free-form (an object or a text); kept with the "
                                                               "dispute for the arbiter.")
    deadline = StrictIntegerField(min_value=0, max_value=MAX_AMOUNT, required=False)
    signature = _signature(required=False)

    def validate_reason(self, value):
        return _shown_prose(value, field="reason")

    def validate_evidence(self, value):
        # As POST .../challenge: kept on the challenge and the dispute, so bounded; an object as its JSON, whole
        # (ASCII: every character escaped), never cut.
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if len(text) > EVIDENCE_MAX_CHARACTERS:
            raise serializers.ValidationError(
                f"Ensure this field has no more than {EVIDENCE_MAX_CHARACTERS} characters (an object: of its JSON).",
                code="max_length")
        return _shown_prose(text, field="evidence")


class DepositParamsSerializer(serializers.Serializer):
    agreement_id = serializers.UUIDField()
    chain_id = serializers.IntegerField()
    usdc_address = serializers.CharField()
    escrow_contract_address = serializers.CharField()
    service_amount_atomic = AtomicAmountField(help_text="The deposit: quantity × unit price.")
    infra_fee_amount_atomic = AtomicAmountField()
    per_call_fee_amount_atomic = AtomicAmountField(help_text="Always 0: no fee per proxied call.")
    onchain_agreement_id = serializers.CharField(help_text="bytes32 id of the agreement in the escrow contract.")
    gas_wallet_address = serializers.CharField(help_text="The platform relayer: the fee permit's spender.")
    buyer_wallet_address = serializers.CharField()
    pricing_version = serializers.CharField(allow_null=True)


class TransactionCalldataSerializer(serializers.Serializer):
    to = serializers.CharField()
    data = serializers.CharField()
    value = serializers.CharField()


class ClaimInstructionsSerializer(serializers.Serializer):
    agreement_id = serializers.UUIDField()
    onchain_agreement_id = serializers.CharField()
    function = serializers.CharField(help_text="`withdraw(bytes32 id, EscrowTerms terms)`: finalize pays both parties out itself; only a "
                                               "payout whose transfer failed waits to be withdrawn.")
    claimable_atomic = AtomicAmountField(help_text="What withdraw would pay the calling party now.")
    transaction = TransactionCalldataSerializer(allow_null=True, help_text="Unsigned; null when nothing is owed.")
    chain_id = serializers.IntegerField()
    closed = serializers.BooleanField(help_text="The escrow is paid out (settled or reclaimed).")


class EscrowStatusQuery(StrictSerializer):
    verify = serializers.BooleanField(required=False, default=False,
                                      help_text="Also read the escrow from the contract.")


class ChallengePackageSerializer(serializers.Serializer):
    deadline = serializers.IntegerField()
    challenge = TypedDataSerializer(help_text="EIP-712 Challenge{agreementId, deadline} to sign with the buyer wallet.")
    challenge_deadline = serializers.DateTimeField(help_text="End of the challenge window.")


class ChallengeSerializer(StrictSerializer):
    reason = serializers.CharField(max_length=500)
    evidence = serializers.CharField(max_length=EVIDENCE_MAX_CHARACTERS, required=False, allow_blank=True, default="")
    deadline = StrictIntegerField(min_value=0, max_value=MAX_AMOUNT)
    signature = _signature()

    def validate_reason(self, value):
        return _shown_prose(value, field="reason")

    def validate_evidence(self, value):
        return _shown_prose(value, field="evidence")


class ResolveSerializer(StrictSerializer):
    seller_amount_atomic = AtomicAmountField(help_text="What the seller receives; the buyer gets the rest.")
