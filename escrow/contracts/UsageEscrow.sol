// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/**
 * @title UsageEscrow
 * @notice Escrow for metered usage agreements between a buyer agent and a seller agent, paid in an ERC-20
 * stablecoin (USDC). The buyer deposits the agreement's maximum amount; the seller is paid what signed usage
 * receipts say was used, the buyer gets the rest back.
 *
 * Lifecycle of one escrow, keyed by its buyer and the marketplace's `agreementId` (each buyer uses an id once, ever):
 *
 *     None --activate--> Active --proposeSettlement--> Proposed --(window over) finalize--> Settled
 *                          |                             |  ^ re-proposal with a higher seq (window restarts)
 *                          |                             +--challenge / challengeWithSig--> Disputed
 *                          |                                          Disputed --resolve--> Resolved --finalize--> Settled
 *                          |                                          Disputed --(DISPUTE_TIMEOUT over) finalize--> Settled
 *                          |                                                      (the buyer refunded the whole deposit)
 *                          +--reclaim (after expiresAt + reclaimGrace, nothing proposed)--> Reclaimed
 *
 * Roles (OpenZeppelin AccessControl):
 * - DEFAULT_ADMIN_ROLE: grants roles, sets the fee recipient, the reclaim grace and the token allowlist.
 * - OPERATOR_ROLE: the platform relayer(s); may propose settlements (the escrow's seller may too).
 * - ARBITER_ROLE: decides disputes with `resolve`.
 *
 * Design decisions (see also each function):
 * - Escrows are keyed by (buyer, agreementId), the buyer being the one whose signature opened it. An agreement's id
 *   is no secret (its parties and anyone watching the relayer's pending transaction learn it), so with a global
 *   key anyone could open an escrow of their own under it first and block the real activation. Keyed by buyer, a
 *   third party's escrow under the same id is its own: it blocks nothing and no call on it reaches the buyer's.
 *   Every call after activation names its escrow by id and the `EscrowTerms` it carries (whose `buyer` picks the
 *   slot); every escrow event carries the buyer as an indexed topic, so readers filter on (agreementId, buyer).
 * - Intent nonces are unordered: `nonce` is any uint256 the buyer has not used or cancelled
 *   (`intentNonceUsed(buyer, nonce)`), so one buyer's activations for different agreements can be signed and
 *   submitted concurrently and in any order. A signed but unsubmitted intent is revoked with
 *   `cancelIntentNonce`.
 * - `depositAmount` must equal `quantity * pricePerUnit` (the agreement's maximum amount).
 * - Both permits name this contract as spender; the contract pulls the deposit and the infra fee into itself.
 *   With one permit (the fee permit absent) it pulls `depositAmount + infraFee` in one transfer; with two,
 *   in this order: escrow permit, pull deposit, fee permit, pull fee. A permit whose `deadline` is 0 is
 *   "absent" and skipped; a permit that reverts (typically because a front-runner already submitted it) is
 *   ignored and the allowance is checked instead. The most front-running-robust form is ONE escrow permit for
 *   `depositAmount + infraFee` and an absent fee permit; with two permits (token nonces n and n+1) a
 *   front-runner who submits both in order leaves an allowance of only the fee, and activation fails (funds
 *   stay with the buyer; the relayer must get new signatures).
 * - The infra fee is collected at activation and never refunded by this contract (a reclaim returns the
 *   deposit). It accrues per token (`feesAccrued`) and `payFees(token)` (callable by anyone) pays it to
 *   `feeRecipient`: one storage update per activation instead of a transfer to the fee recipient.
 * - Gas: an escrow stores the hash of its terms (`EscrowTerms`: what the calls after activation check) and
 *   its settlement state packed into one word, the buyer's word for the intent nonce (which marks the nonce
 *   used anyway); every call after activation carries the terms back in calldata and reverts TermsMismatch
 *   when they are not the escrow's. The terms are in the {Activated} event; `getEscrow(id, terms)` reads the
 *   state. `seq` fits in 72 bits, amounts in 128 (a larger deposit is an InvalidDeposit).
 * - Settlement proposals: only an operator or the escrow's seller (never the buyer, who could otherwise
 *   submit an old, lower receipt). The first proposal must come before `reclaimAfter`
 *   (= expiresAt + reclaimGrace at activation), so proposal and reclaim never race. While the window is
 *   open a receipt with a strictly higher `seq` replaces the proposal and restarts the window.
 * - Window boundaries: a challenge is accepted while `block.timestamp < challengeDeadline`; finalize from
 *   `block.timestamp >= challengeDeadline` on.
 * - Dispute timeout: a challenge sets the escrow's `challengeDeadline` (no further use once Disputed: same word, no
 *   extra storage) to `block.timestamp + DISPUTE_TIMEOUT`. The arbiter may `resolve` while `block.timestamp <` that
 *   moment; from it on `resolve` reverts DisputeTimedOut and anyone may `finalize`, which refunds the buyer the
 *   whole deposit: the seller's proposal was disputed and never upheld. So a lost, compromised or absent arbiter
 *   cannot lock a deposit for ever, and the arbiter's decision and the timeout never race (one excludes the other
 *   by the block's timestamp). `getEscrow` returns the moment as `challengeDeadline` while Disputed.
 * - Payouts are pushed to each party with a non-reverting transfer; a failed transfer (e.g. a USDC-blacklisted
 *   address) credits that party's `claimable` and emits {PayoutDeferred}, and never blocks the other party.
 *   `withdraw(id, terms)` (callable by anyone: the money only ever goes to the party's own address) retries.
 *   Credits are never redirected to another address, so a token's blacklist is not circumvented.
 * - Only allowlisted tokens can be escrowed, so payout transfers only ever call known token contracts.
 * - Activation measures what came in (the escrow's token balance before and after its pulls) and reverts
 *   ShortTransfer when it is less than `depositAmount + infraFee`: a token taking a fee on transfer (an allowlisted
 *   upgradeable token whose issuer turns one on) cannot open an escrow that owes more than it holds.
 * - Signatures are checked with SignatureChecker: EOAs (ECDSA, low-s only) and ERC-1271 contract wallets.
 *
 * Known limits: a Disputed escrow waits up to DISPUTE_TIMEOUT (30 days) for the arbiter; an arbiter who does not
 * decide in time gives the buyer the whole deposit, whatever the seller was owed. Usage receipts and challenge
 * signatures name the agreement id, not the buyer: a receipt is valid on any escrow under that id whose
 * `receiptSigner` signed it, which moves only that escrow's own deposit (a third party's escrow naming the
 * platform's receipt signer pays its own seller from its own deposit); a challenge signature is checked against
 * the escrow's own buyer.
 */
contract UsageEscrow is EIP712, AccessControl, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    // ---------------------------------------------------------------- types

    enum State {
        None,
        Active,
        Proposed,
        Disputed,
        Resolved,
        Settled,
        Reclaimed
    }

    /// @notice What the buyer signs (EIP-712, domain {name: "UsageEscrow", version: "1"}).
    struct ActivationIntent {
        bytes32 agreementId;
        address buyer;
        address seller;
        address token;
        uint256 quantity;
        uint256 pricePerUnit;
        uint256 depositAmount;
        uint256 infraFee;
        address receiptSigner;
        uint64 challengeWindow;
        uint64 expiresAt;
        bytes32 termsHash;
        uint256 nonce;
        uint256 deadline;
    }

    /// @notice An EIP-2612 permit signed by the buyer with this contract as spender. `deadline == 0`: absent.
    struct Permit {
        uint256 value;
        uint256 deadline;
        uint8 v;
        bytes32 r;
        bytes32 s;
    }

    /// @notice What an escrow keeps of its intent for the calls after activation. Storage holds only its hash
    /// (`termsDigest(buyer, agreementId)`); every later call carries the terms back in calldata and the contract checks
    /// them against the hash (TermsMismatch). All of them are in the {Activated} event.
    struct EscrowTerms {
        address buyer;
        address seller;
        address token;
        address receiptSigner;
        uint256 depositAmount;
        uint64 challengeWindow;
        /// @dev expiresAt + reclaimGrace at activation.
        uint64 reclaimAfter;
        /// @dev The intent's nonce: the escrow's settlement state lives in the buyer's word for it.
        uint256 nonce;
    }

    /// @dev One word per (buyer, intent nonce), non-zero once the nonce is used or cancelled. The nonce of an
    /// activated intent holds its escrow's settlement state, so activation writes two slots (this word and the
    /// terms digest) and every later step updates this one word.
    struct IntentSlot {
        bool used;
        State state;
        /// @dev Proposed: the challenge window's end. Disputed (and Resolved): the dispute's timeout.
        uint40 challengeDeadline;
        uint72 lastSeq;
        /// @dev Seller's amount: the proposed cumulative amount, then the arbiter's decision if disputed (at most the
        /// proposal; 0 when the dispute timed out).
        uint128 settledAmount;
    }

    /// @dev Amounts credited but not yet transferred (push failed); paid by `withdraw`.
    struct Claims {
        uint128 buyer;
        uint128 seller;
    }

    /// @notice An escrow as {getEscrow} returns it; the terms are in the {Activated} event.
    struct EscrowView {
        State state;
        /// @dev Proposed: the challenge window's end. Disputed: the dispute's timeout (DISPUTE_TIMEOUT).
        uint64 challengeDeadline;
        uint256 lastSeq;
        uint256 settledAmount;
        uint256 buyerClaimable;
        uint256 sellerClaimable;
    }

    // ---------------------------------------------------------------- constants

    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");
    bytes32 public constant ARBITER_ROLE = keccak256("ARBITER_ROLE");

    bytes32 public constant ACTIVATION_INTENT_TYPEHASH = keccak256(
        "ActivationIntent(bytes32 agreementId,address buyer,address seller,address token,uint256 quantity,uint256 pricePerUnit,uint256 depositAmount,uint256 infraFee,address receiptSigner,uint64 challengeWindow,uint64 expiresAt,bytes32 termsHash,uint256 nonce,uint256 deadline)"
    );
    bytes32 public constant USAGE_RECEIPT_TYPEHASH =
        keccak256("UsageReceipt(bytes32 agreementId,uint256 seq,uint256 cumulativeAmount,bytes32 usageDigest)");
    bytes32 public constant CHALLENGE_TYPEHASH = keccak256("Challenge(bytes32 agreementId,uint256 deadline)");

    /// @notice Upper bound of an intent's challenge window (a longer one would lock funds for too long).
    uint64 public constant MAX_CHALLENGE_WINDOW = 30 days;
    /// @notice Upper bound of the reclaim grace the admin can set.
    uint64 public constant MAX_RECLAIM_GRACE = 90 days;
    /// @notice How long after its challenge a Disputed escrow waits for the arbiter's `resolve`; from then on
    /// `finalize` (anyone) refunds the buyer the whole deposit, and `resolve` reverts DisputeTimedOut.
    uint64 public constant DISPUTE_TIMEOUT = 30 days;

    // ---------------------------------------------------------------- storage

    /// @dev Escrows are keyed by (buyer, agreementId): a third party who opens an escrow under an agreement's id
    /// opens its own, beside the buyer's, and can neither block nor touch the buyer's.
    mapping(address buyer => mapping(bytes32 agreementId => bytes32 digest)) private _termsDigests;
    mapping(address buyer => mapping(uint256 nonce => IntentSlot)) private _intents;
    mapping(address buyer => mapping(bytes32 agreementId => Claims)) private _claims;

    /// @notice Whether a token may be escrowed.
    mapping(address token => bool allowed) public isTokenAllowed;
    /// @notice Receives the infra fees (see {payFees}).
    address public feeRecipient;
    /// @notice Seconds after an escrow's `expiresAt` from which an unproposed escrow can be reclaimed.
    /// Snapshotted into each escrow at activation (`reclaimAfter`); changing it affects new escrows only.
    uint64 public reclaimGrace;
    /// @notice Infra fees collected at activation and not yet paid to `feeRecipient`, per token.
    mapping(address token => uint256 amount) public feesAccrued;

    // ---------------------------------------------------------------- events

    event Activated(
        bytes32 indexed agreementId,
        address indexed buyer,
        address indexed seller,
        address token,
        uint256 depositAmount,
        uint256 infraFee,
        address receiptSigner,
        bytes32 termsHash,
        uint64 expiresAt,
        uint64 reclaimAfter,
        uint64 challengeWindow,
        uint256 nonce
    );
    event SettlementProposed(
        bytes32 indexed agreementId,
        address indexed buyer,
        uint256 seq,
        uint256 cumulativeAmount,
        bytes32 usageDigest,
        uint64 challengeDeadline
    );
    event Challenged(bytes32 indexed agreementId, address indexed buyer);
    event Resolved(
        bytes32 indexed agreementId,
        address indexed buyer,
        address indexed arbiter,
        uint256 sellerAmount,
        uint256 buyerAmount
    );
    event Settled(bytes32 indexed agreementId, address indexed buyer, uint256 sellerAmount, uint256 buyerAmount);
    event Reclaimed(bytes32 indexed agreementId, address indexed buyer, uint256 amount);
    /// @notice A push payout failed; `amount` stays claimable by `party` through `withdraw`.
    event PayoutDeferred(bytes32 indexed agreementId, address indexed buyer, address indexed party, uint256 amount);
    event Withdrawn(bytes32 indexed agreementId, address indexed buyer, address indexed party, uint256 amount);
    event IntentNonceCancelled(address indexed buyer, uint256 nonce);
    event FeesPaid(address indexed token, address indexed feeRecipient, uint256 amount);
    event FeeRecipientUpdated(address feeRecipient);
    event ReclaimGraceUpdated(uint64 reclaimGrace);
    event TokenAllowed(address indexed token, bool allowed);

    // ---------------------------------------------------------------- errors

    error ZeroAddress();
    error TokenNotAllowed(address token);
    error InvalidDeposit(uint256 quantity, uint256 pricePerUnit, uint256 depositAmount);
    error InvalidChallengeWindow(uint64 challengeWindow);
    error InvalidExpiry(uint64 expiresAt);
    error InvalidReclaimGrace(uint64 reclaimGrace);
    error IntentExpired(uint256 deadline);
    error IntentNonceUsed(address buyer, uint256 nonce);
    error InvalidBuyerSignature();
    error InvalidReceiptSignature();
    error InsufficientAllowance(uint256 required, uint256 allowance);
    error AgreementExists(bytes32 agreementId);
    error InvalidState(bytes32 agreementId, State state);
    error NotBuyer(address caller);
    error NotOperatorOrSeller(address caller);
    error ProposalPeriodOver(uint64 reclaimAfter);
    error StaleReceipt(uint256 seq, uint256 lastSeq);
    error AmountExceedsDeposit(uint256 amount, uint256 depositAmount);
    error AmountExceedsProposal(uint256 amount, uint256 proposedAmount);
    error ChallengeWindowClosed(uint64 challengeDeadline);
    error ChallengeWindowOpen(uint64 challengeDeadline);
    error DisputeNotTimedOut(uint64 disputeTimeout);
    error DisputeTimedOut(uint64 disputeTimeout);
    error SignatureExpired(uint256 deadline);
    error ReclaimNotYetAllowed(uint64 reclaimAfter);
    error NothingToWithdraw(bytes32 agreementId);
    error PayoutFailed(bytes32 agreementId);
    error InsufficientGasForPayout();
    error TermsMismatch(bytes32 agreementId);
    error ShortTransfer(uint256 expected, uint256 received);

    // ---------------------------------------------------------------- setup

    /**
     * @param admin Holder of DEFAULT_ADMIN_ROLE.
     * @param operator First holder of OPERATOR_ROLE (the relayer); may be the zero address to grant later.
     * @param arbiter First holder of ARBITER_ROLE; may be the zero address to grant later.
     * @param feeRecipient_ Receives infra fees.
     * @param reclaimGrace_ Seconds after `expiresAt` before an unproposed escrow can be reclaimed.
     */
    constructor(address admin, address operator, address arbiter, address feeRecipient_, uint64 reclaimGrace_)
        EIP712("UsageEscrow", "1")
    {
        if (admin == address(0)) revert ZeroAddress();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        if (operator != address(0)) _grantRole(OPERATOR_ROLE, operator);
        if (arbiter != address(0)) _grantRole(ARBITER_ROLE, arbiter);
        _setFeeRecipient(feeRecipient_);
        _setReclaimGrace(reclaimGrace_);
    }

    function setFeeRecipient(address feeRecipient_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setFeeRecipient(feeRecipient_);
    }

    function setReclaimGrace(uint64 reclaimGrace_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setReclaimGrace(reclaimGrace_);
    }

    function setTokenAllowed(address token, bool allowed) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (token == address(0)) revert ZeroAddress();
        isTokenAllowed[token] = allowed;
        emit TokenAllowed(token, allowed);
    }

    function _setFeeRecipient(address feeRecipient_) private {
        if (feeRecipient_ == address(0)) revert ZeroAddress();
        feeRecipient = feeRecipient_;
        emit FeeRecipientUpdated(feeRecipient_);
    }

    function _setReclaimGrace(uint64 reclaimGrace_) private {
        if (reclaimGrace_ > MAX_RECLAIM_GRACE) revert InvalidReclaimGrace(reclaimGrace_);
        reclaimGrace = reclaimGrace_;
        emit ReclaimGraceUpdated(reclaimGrace_);
    }

    // ---------------------------------------------------------------- activation

    /**
     * @notice Open `intent.buyer`'s escrow for `intent.agreementId`. Callable by anyone (normally the platform
     * relayer): the buyer's signature over the intent is the authorization.
     * @dev Reverts: AgreementExists (this buyer used the id before), IntentExpired (`block.timestamp > deadline`),
     * IntentNonceUsed, ZeroAddress (buyer, seller or receiptSigner), TokenNotAllowed, InvalidDeposit
     * (`depositAmount == 0` or `!= quantity * pricePerUnit`), InvalidChallengeWindow (0 or over the max),
     * InvalidExpiry (`expiresAt <= block.timestamp`), InvalidBuyerSignature, InsufficientAllowance (after
     * the permits were tried), ShortTransfer (the token moved less into the escrow than it pulled), and the token's
     * own errors (e.g. balance).
     * Note: another buyer's escrow under the same id does not matter (escrows are keyed by buyer); AgreementExists
     * means this buyer's escrow exists already: its intent relayed by someone else, or another intent it signed.
     * @param intent The terms the buyer signed.
     * @param buyerSig The buyer's EIP-712 signature over `intent` (65-byte ECDSA or ERC-1271).
     * @param escrowPermit EIP-2612 permit for at least `depositAmount` (or `depositAmount + infraFee`), or absent.
     * @param feePermit EIP-2612 permit for the infra fee, or absent; ignored when `infraFee == 0`.
     */
    function activate(
        ActivationIntent calldata intent,
        bytes calldata buyerSig,
        Permit calldata escrowPermit,
        Permit calldata feePermit
    ) external nonReentrant {
        bytes32 id = intent.agreementId;
        if (_termsDigests[intent.buyer][id] != 0) revert AgreementExists(id);
        if (block.timestamp > intent.deadline) revert IntentExpired(intent.deadline);
        IntentSlot storage slot = _intents[intent.buyer][intent.nonce];
        if (slot.used) revert IntentNonceUsed(intent.buyer, intent.nonce);
        if (intent.buyer == address(0) || intent.seller == address(0) || intent.receiptSigner == address(0)) {
            revert ZeroAddress();
        }
        if (!isTokenAllowed[intent.token]) revert TokenNotAllowed(intent.token);
        if (
            intent.depositAmount == 0 || intent.pricePerUnit == 0 || intent.depositAmount > type(uint128).max
                || intent.depositAmount / intent.pricePerUnit != intent.quantity
                || intent.depositAmount % intent.pricePerUnit != 0
        ) {
            revert InvalidDeposit(intent.quantity, intent.pricePerUnit, intent.depositAmount);
        }
        if (intent.challengeWindow == 0 || intent.challengeWindow > MAX_CHALLENGE_WINDOW) {
            revert InvalidChallengeWindow(intent.challengeWindow);
        }
        if (intent.expiresAt <= block.timestamp) revert InvalidExpiry(intent.expiresAt);
        if (!SignatureChecker.isValidSignatureNow(intent.buyer, activationIntentDigest(intent), buyerSig)) {
            revert InvalidBuyerSignature();
        }

        slot.used = true;
        slot.state = State.Active;
        uint64 reclaimAfter = SafeCast.toUint64(uint256(intent.expiresAt) + reclaimGrace);
        _termsDigests[intent.buyer][id] = hashTerms(
            EscrowTerms({
                buyer: intent.buyer,
                seller: intent.seller,
                token: intent.token,
                receiptSigner: intent.receiptSigner,
                depositAmount: intent.depositAmount,
                challengeWindow: intent.challengeWindow,
                reclaimAfter: reclaimAfter,
                nonce: intent.nonce
            })
        );

        _pullDepositAndFee(intent, escrowPermit, feePermit);
        if (intent.infraFee > 0) feesAccrued[intent.token] += intent.infraFee;

        _emitActivated(intent, reclaimAfter);
    }

    function _emitActivated(ActivationIntent calldata intent, uint64 reclaimAfter) private {
        emit Activated(
            intent.agreementId,
            intent.buyer,
            intent.seller,
            intent.token,
            intent.depositAmount,
            intent.infraFee,
            intent.receiptSigner,
            intent.termsHash,
            intent.expiresAt,
            reclaimAfter,
            intent.challengeWindow,
            intent.nonce
        );
    }

    /// @dev Pull the deposit and the infra fee (one transfer, or two with a fee permit) and check that the escrow's
    /// balance grew by both: a token paying less than asked (a transfer fee its issuer turned on) would leave this
    /// escrow's payouts to be taken from the other escrows' deposits. Reverts ShortTransfer.
    function _pullDepositAndFee(ActivationIntent calldata intent, Permit calldata escrowPermit, Permit calldata feePermit)
        private
    {
        IERC20 token = IERC20(intent.token);
        uint256 amount = intent.depositAmount + intent.infraFee;
        uint256 balanceBefore = token.balanceOf(address(this));
        if (intent.infraFee == 0 || feePermit.deadline == 0) {
            _pull(token, intent.buyer, amount, escrowPermit);
        } else {
            _pull(token, intent.buyer, intent.depositAmount, escrowPermit);
            _pull(token, intent.buyer, intent.infraFee, feePermit);
        }
        uint256 received = token.balanceOf(address(this)) - balanceBefore;
        if (received < amount) revert ShortTransfer(amount, received);
    }

    /// @dev Run the permit if present, tolerating a revert (front-run or stale), then move `amount` from
    /// `from` into this contract with its allowance.
    function _pull(IERC20 token, address from, uint256 amount, Permit calldata p) private {
        if (p.deadline != 0) {
            try IERC20Permit(address(token)).permit(from, address(this), p.value, p.deadline, p.v, p.r, p.s) {}
                catch {}
        }
        uint256 allowance = token.allowance(from, address(this));
        if (allowance < amount) revert InsufficientAllowance(amount, allowance);
        token.safeTransferFrom(from, address(this), amount);
    }

    /**
     * @notice Pay the infra fees accrued in `token` to `feeRecipient`. Anyone may call it (the money only ever
     * goes to the fee recipient). Reverts NothingToWithdraw(0) when nothing is accrued; a failed transfer
     * reverts and leaves the fees accrued.
     */
    function payFees(address token) external nonReentrant {
        uint256 amount = feesAccrued[token];
        if (amount == 0) revert NothingToWithdraw(bytes32(0));
        feesAccrued[token] = 0;
        address recipient = feeRecipient;
        IERC20(token).safeTransfer(recipient, amount);
        emit FeesPaid(token, recipient, amount);
    }

    /// @notice Revoke a signed intent nonce that has not been used yet (the caller is the buyer).
    function cancelIntentNonce(uint256 nonce) external {
        IntentSlot storage slot = _intents[msg.sender][nonce];
        if (slot.used) revert IntentNonceUsed(msg.sender, nonce);
        slot.used = true;
        emit IntentNonceCancelled(msg.sender, nonce);
    }

    // ---------------------------------------------------------------- settlement

    /// @dev The settlement state of `t.buyer`'s escrow `id`, whose terms the call carries: reverts
    /// InvalidState(id, None) when that buyer never activated `id` and TermsMismatch when `t` is not the escrow's
    /// terms (so another buyer's escrow under the same id is never reached).
    function _escrow(bytes32 id, EscrowTerms calldata t) private view returns (IntentSlot storage) {
        bytes32 digest = _termsDigests[t.buyer][id];
        if (digest == 0) revert InvalidState(id, State.None);
        if (hashTerms(t) != digest) revert TermsMismatch(id);
        return _intents[t.buyer][t.nonce];
    }

    /**
     * @notice Propose the seller's amount from a usage receipt signed by the escrow's `receiptSigner`:
     * `UsageReceipt{agreementId, seq, cumulativeAmount, usageDigest}`. Starts (or restarts) the challenge
     * window: `challengeDeadline = block.timestamp + challengeWindow`.
     * @dev Caller: OPERATOR_ROLE or the escrow's seller. Allowed when Active and `block.timestamp <
     * reclaimAfter` (else ProposalPeriodOver), or when Proposed, the window still open (else
     * ChallengeWindowClosed) and `seq > lastSeq` (else StaleReceipt). Reverts TermsMismatch when `t` is not the
     * escrow's terms, AmountExceedsDeposit when `cumulativeAmount > depositAmount`, InvalidReceiptSignature when
     * not signed by `receiptSigner`. `seq` must fit in 72 bits.
     */
    function proposeSettlement(
        bytes32 id,
        EscrowTerms calldata t,
        uint256 seq,
        uint256 cumulativeAmount,
        bytes32 usageDigest,
        bytes calldata receiptSig
    ) external {
        IntentSlot storage e = _escrow(id, t);
        State state = e.state;
        if (state == State.Active) {
            if (block.timestamp >= t.reclaimAfter) revert ProposalPeriodOver(t.reclaimAfter);
        } else if (state == State.Proposed) {
            if (block.timestamp >= e.challengeDeadline) revert ChallengeWindowClosed(e.challengeDeadline);
            if (seq <= e.lastSeq) revert StaleReceipt(seq, e.lastSeq);
        } else {
            revert InvalidState(id, state);
        }
        if (msg.sender != t.seller && !hasRole(OPERATOR_ROLE, msg.sender)) revert NotOperatorOrSeller(msg.sender);
        if (cumulativeAmount > t.depositAmount) revert AmountExceedsDeposit(cumulativeAmount, t.depositAmount);
        bytes32 digest = usageReceiptDigest(id, seq, cumulativeAmount, usageDigest);
        if (!SignatureChecker.isValidSignatureNow(t.receiptSigner, digest, receiptSig)) {
            revert InvalidReceiptSignature();
        }

        uint40 deadline = SafeCast.toUint40(block.timestamp + t.challengeWindow);
        e.state = State.Proposed;
        e.challengeDeadline = deadline;
        e.lastSeq = SafeCast.toUint72(seq);
        e.settledAmount = uint128(cumulativeAmount); // <= depositAmount, which fits in 128 bits
        emit SettlementProposed(id, t.buyer, seq, cumulativeAmount, usageDigest, deadline);
    }

    /// @notice The buyer disputes the proposed settlement while the window is open. Proposed -> Disputed.
    function challenge(bytes32 id, EscrowTerms calldata t) external {
        IntentSlot storage e = _escrow(id, t);
        if (msg.sender != t.buyer) revert NotBuyer(msg.sender);
        _challenge(id, e, t.buyer);
    }

    /**
     * @notice Submit the buyer's signed `Challenge{agreementId, deadline}` (EIP-712) on the buyer's behalf;
     * anyone may submit it. Proposed -> Disputed. Reverts SignatureExpired when `block.timestamp > deadline`,
     * InvalidBuyerSignature when not signed by the escrow's buyer. The signature names the escrow, not one
     * proposal: it disputes whatever is proposed when it is submitted, and is spent by the state change.
     */
    function challengeWithSig(bytes32 id, EscrowTerms calldata t, uint256 deadline, bytes calldata buyerSig)
        external
    {
        if (block.timestamp > deadline) revert SignatureExpired(deadline);
        IntentSlot storage e = _escrow(id, t);
        if (!SignatureChecker.isValidSignatureNow(t.buyer, challengeDigest(id, deadline), buyerSig)) {
            revert InvalidBuyerSignature();
        }
        _challenge(id, e, t.buyer);
    }

    /// @dev Proposed -> Disputed; the window's end, of no further use, becomes the dispute's timeout (same word).
    function _challenge(bytes32 id, IntentSlot storage e, address buyer) private {
        if (e.state != State.Proposed) revert InvalidState(id, e.state);
        if (block.timestamp >= e.challengeDeadline) revert ChallengeWindowClosed(e.challengeDeadline);
        e.state = State.Disputed;
        e.challengeDeadline = SafeCast.toUint40(block.timestamp + DISPUTE_TIMEOUT);
        emit Challenged(id, buyer);
    }

    /// @notice The arbiter decides a dispute: the seller gets `sellerAmount`, the buyer the rest of the
    /// deposit. Disputed -> Resolved; `finalize` then pays out. Only before the dispute's timeout
    /// (`block.timestamp < challengeDeadline`, see DISPUTE_TIMEOUT): from then on it reverts DisputeTimedOut and the
    /// escrow is the buyer's (`finalize`), so a late decision never races the timeout. Reverts AmountExceedsDeposit,
    /// and AmountExceedsProposal when `sellerAmount` is more than the proposal the buyer disputed (its signed
    /// receipts are all the seller claimed): an arbiter, rogue or compromised, can uphold the proposal or cut it,
    /// never leave the buyer worse off for disputing.
    function resolve(bytes32 id, EscrowTerms calldata t, uint256 sellerAmount) external onlyRole(ARBITER_ROLE) {
        IntentSlot storage e = _escrow(id, t);
        if (e.state != State.Disputed) revert InvalidState(id, e.state);
        if (block.timestamp >= e.challengeDeadline) revert DisputeTimedOut(e.challengeDeadline);
        if (sellerAmount > t.depositAmount) revert AmountExceedsDeposit(sellerAmount, t.depositAmount);
        if (sellerAmount > e.settledAmount) revert AmountExceedsProposal(sellerAmount, e.settledAmount);
        e.state = State.Resolved;
        e.settledAmount = uint128(sellerAmount); // <= depositAmount, which fits in 128 bits
        emit Resolved(id, t.buyer, msg.sender, sellerAmount, t.depositAmount - sellerAmount);
    }

    /**
     * @notice Settle: the seller gets `settledAmount`, the buyer `depositAmount - settledAmount`. Anyone may
     * call it once the window is over (Proposed and `block.timestamp >= challengeDeadline`) or after a
     * resolution (Resolved). A dispute the arbiter did not resolve by its timeout (Disputed and `block.timestamp >=
     * challengeDeadline`, see DISPUTE_TIMEOUT) settles with the seller getting 0 and the buyer the whole deposit:
     * the seller's disputed proposal was never upheld (before the timeout: DisputeNotTimedOut). -> Settled, exactly
     * once. Each party is paid in its own transfer; one that fails is credited to that party (PayoutDeferred) and can
     * be collected later with `withdraw`.
     */
    function finalize(bytes32 id, EscrowTerms calldata t) external nonReentrant {
        IntentSlot storage e = _escrow(id, t);
        State state = e.state;
        uint256 sellerAmount = e.settledAmount;
        if (state == State.Proposed) {
            if (block.timestamp < e.challengeDeadline) revert ChallengeWindowOpen(e.challengeDeadline);
        } else if (state == State.Disputed) {
            if (block.timestamp < e.challengeDeadline) revert DisputeNotTimedOut(e.challengeDeadline);
            sellerAmount = 0;
            e.settledAmount = 0; // what getEscrow says the seller got
        } else if (state != State.Resolved) {
            revert InvalidState(id, state);
        }
        uint256 buyerAmount = t.depositAmount - sellerAmount;
        e.state = State.Settled;
        emit Settled(id, t.buyer, sellerAmount, buyerAmount);

        IERC20 token = IERC20(t.token);
        if (!_tryPay(token, t.seller, sellerAmount)) {
            _claims[t.buyer][id].seller = uint128(sellerAmount);
            emit PayoutDeferred(id, t.buyer, t.seller, sellerAmount);
        }
        if (!_tryPay(token, t.buyer, buyerAmount)) {
            _claims[t.buyer][id].buyer = uint128(buyerAmount);
            emit PayoutDeferred(id, t.buyer, t.buyer, buyerAmount);
        }
    }

    /**
     * @notice Return the whole deposit to the buyer of an escrow on which nothing was proposed, from
     * `reclaimAfter` (= expiresAt + reclaimGrace) on. Anyone may call it (the relayer, for the buyer).
     * Active -> Reclaimed. Push with pull fallback as in `finalize`.
     */
    function reclaim(bytes32 id, EscrowTerms calldata t) external nonReentrant {
        IntentSlot storage e = _escrow(id, t);
        if (e.state != State.Active) revert InvalidState(id, e.state);
        if (block.timestamp < t.reclaimAfter) revert ReclaimNotYetAllowed(t.reclaimAfter);
        uint256 amount = t.depositAmount;
        e.state = State.Reclaimed;
        emit Reclaimed(id, t.buyer, amount);
        if (!_tryPay(IERC20(t.token), t.buyer, amount)) {
            _claims[t.buyer][id].buyer = uint128(amount);
            emit PayoutDeferred(id, t.buyer, t.buyer, amount);
        }
    }

    /**
     * @notice Pay out what `finalize` / `reclaim` credited but could not transfer, each party to its own
     * address. Anyone may call it. A party whose transfer still fails keeps its credit. Reverts
     * NothingToWithdraw when nothing is credited, PayoutFailed when nothing could be paid.
     */
    function withdraw(bytes32 id, EscrowTerms calldata t) external nonReentrant {
        Claims storage c = _claims[t.buyer][id];
        uint256 sellerAmount = c.seller;
        uint256 buyerAmount = c.buyer;
        if (sellerAmount == 0 && buyerAmount == 0) revert NothingToWithdraw(id);
        _escrow(id, t);
        IERC20 token = IERC20(t.token);
        bool paid;
        if (sellerAmount > 0) {
            c.seller = 0;
            if (_tryPay(token, t.seller, sellerAmount)) {
                paid = true;
                emit Withdrawn(id, t.buyer, t.seller, sellerAmount);
            } else {
                c.seller = uint128(sellerAmount);
            }
        }
        if (buyerAmount > 0) {
            c.buyer = 0;
            if (_tryPay(token, t.buyer, buyerAmount)) {
                paid = true;
                emit Withdrawn(id, t.buyer, t.buyer, buyerAmount);
            } else {
                c.buyer = uint128(buyerAmount);
            }
        }
        if (!paid) revert PayoutFailed(id);
    }

    /// @dev A transfer that returns false instead of reverting. Refuses to count an out-of-gas failure
    /// caused by a caller who sent too little gas (which would otherwise defer a payable party on purpose).
    function _tryPay(IERC20 token, address to, uint256 amount) private returns (bool ok) {
        if (amount == 0) return true;
        uint256 gasBefore = gasleft();
        ok = token.trySafeTransfer(to, amount);
        if (!ok && gasleft() <= gasBefore / 63) revert InsufficientGasForPayout();
    }

    // ---------------------------------------------------------------- views

    /// @notice The state of `t.buyer`'s escrow `id`, given its terms (from its {Activated} event; reverts
    /// TermsMismatch when they are not its terms). State None: that buyer never activated `id`.
    function getEscrow(bytes32 id, EscrowTerms calldata t) external view returns (EscrowView memory) {
        if (_termsDigests[t.buyer][id] == 0) return EscrowView(State.None, 0, 0, 0, 0, 0);
        IntentSlot storage e = _escrow(id, t);
        Claims storage c = _claims[t.buyer][id];
        return EscrowView({
            state: e.state,
            challengeDeadline: e.challengeDeadline,
            lastSeq: e.lastSeq,
            settledAmount: e.settledAmount,
            buyerClaimable: c.buyer,
            sellerClaimable: c.seller
        });
    }

    /// @notice {hashTerms} of the terms of `buyer`'s escrow `id`; 0 when `buyer` never activated `id`.
    function termsDigest(address buyer, bytes32 id) external view returns (bytes32) {
        return _termsDigests[buyer][id];
    }

    /// @notice What an escrow stores of its terms.
    function hashTerms(EscrowTerms memory terms) public pure returns (bytes32) {
        return keccak256(abi.encode(terms));
    }

    function intentNonceUsed(address buyer, uint256 nonce) external view returns (bool) {
        return _intents[buyer][nonce].used;
    }

    // solhint-disable-next-line func-name-mixedcase
    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @notice The EIP-712 digest the buyer signs for `intent`.
    function activationIntentDigest(ActivationIntent calldata intent) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(ACTIVATION_INTENT_TYPEHASH, intent)));
    }

    /// @notice The EIP-712 digest the receipt signer signs for a usage receipt.
    function usageReceiptDigest(bytes32 id, uint256 seq, uint256 cumulativeAmount, bytes32 usageDigest)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(USAGE_RECEIPT_TYPEHASH, id, seq, cumulativeAmount, usageDigest)));
    }

    /// @notice The EIP-712 digest the buyer signs for `challengeWithSig`.
    function challengeDigest(bytes32 id, uint256 deadline) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(CHALLENGE_TYPEHASH, id, deadline)));
    }
}
