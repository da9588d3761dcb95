"""The SDK's version: its distribution's (sdk/pyproject.toml reads it from here) and its User-Agent's."""

# 0.4.21: verify_usage (MarketplaceClient's and sdk.receipts') holds an escrow read in state "none" to nothing: its
# charges above a deposit of 0 (UsageAboveDeposit) and a receipt recovering to its receipt signer refused unless that
# signer is pinned (ReceiptSignerMismatch): a hostile node's record of an Activated event naming its own signer and a
# larger deposit, with getEscrow answering state 0, was exempt from the pinned signer and the deposit checks, and a
# listing signed with its key verified; a localhost name (`*.localhost`, `localhost.`, sent plain http as this
# machine's) is connected to at the loopback addresses it resolves to only (none: httpx.ConnectError): the system
# resolver may ask DNS for it, and a hostile answer had the API key sent to another machine in clear; challenge and
# request_refund ask the RPC's chain id first, as every other signing does (SigningRefused on "rpc chain id"): the
# clock and escrow record bounding a Challenge's deadline were read from whatever chain the RPC served; so do the
# reads taking a status as shown on-chain (wait_until, escrow_status(verify=True), complete(wait=True),
# wait_for_purchase, cancel_payment_authorization(wait=True)): another chain's shows nothing, the wait goes on; an RPC
# node's JSON-RPC error text is one line of at most 500 characters in RpcError, what is not printable a space (it
# went in as it came, newlines forging the agent's log lines); so is the status a wait's TimeoutError names, and the
# transaction or reason PaymentAuthorizationUsed and PaymentAuthorizationCancelFailed name (the marketplace's text,
# whole); a SigningRefused's text shows at most 200 characters of the values compared (received keeps it whole);
# 0.4.20: get_agreement, get_purchase and get_invocation (and wait_until, escrow_status, wait_for_purchase,
# wait_for_invocation, request_refund, invoke_skill through them) raise sdk.AnswerMismatch (an UnexpectedAnswer,
# with field, expected, received) on an answer naming another agreement, purchase (blockchainIdentifier, compared as
# the number it spells) or invocation than the one asked: another of the buyer's agreements, active on-chain, passed
# for one never funded; invoke_skill returns an invocation the marketplace names after the payment only if it is of
# the call paid (its skill, its seller when named by handle, payment.amount_atomic the amount signed; a sync answer's
# amount too), else AnswerMismatch (the payment sent); wait_for_purchase takes agreement_id= and, with rpc_url,
# reads the escrow of the agreement the purchase's blockchainIdentifier is the escrow id of, or of agreement_id
# (a payment request's purchase), not any agreementId the marketplace writes; request_refund's purchase of another
# identifier is AnswerMismatch (SigningRefused on purchase.blockchainIdentifier before, which also refused the same
# identifier spelled otherwise); MarketplaceClient refuses an api_key holding whitespace, a control or a non-ASCII
# character (ValueError, the key not quoted) before anything is sent: httpx's LocalProtocolError quoted it whole
# (a key read from a file with its newline); ChainReader reads a quantity (chain id, block number, timestamp) only
# as "0x" and 1 to 64 hex digits (MalformedAnswer): a decimal "2105" was read as 0x2105, "-0x1" as -1;
# propose_direct_purchase answered with the agreement of an earlier purchase this client signed (not its replay)
# raises AnswerMismatch on agreement.id: wait_until(id, paid) showed the earlier payment used for it, the new
# authorization left unrevoked; a MarketplaceError's code and message, and an AgreementFailed's reason, are one line
# of at most 500 characters, what is not printable shown as a space: a refusal's JSON text went whole into the
# exception (and the agent's log), newlines and terminal escapes forging lines, 100 kB filling it;
# 0.4.19: sign_wallet_proof takes escrow_address= (the pinned NetworkConfig's) and signs the WalletProof in the domain
# {name, version "2", chainId, verifyingContract: the deployment's escrow contract} (sdk.typed_data.wallet_proof
# likewise): version "1" named no contract, and a proof a wallet gave one marketplace deployment was accepted by any
# other on the chain (the same default name) for the same owner id and handle within the day; with offered= (the
# typed data of the marketplace's 400 wallet_proof_required) it refuses a message other than the one it builds
# (SigningRefused on "wallet_proof.<field>": another deployment's escrow, chain or name, another handle or owner);
# also 0.4.19: sdk.receipts.verify_usage requires pinned_receipt_signers (TypeError without, or empty): a caller leaving
# it out accepted receipts signed by any key the escrow record handed in named; with rpc_url and the pinned network,
# wait_until returns a status the escrow has on-chain (active, in_challenge, disputed, settling, settled, refunded)
# only once the buyer's escrow shows it through the RPC (active: the stated terms and deposit), and paid (a direct
# purchase this client signed) once its payment_tx_hash shows the token's AuthorizationUsed of the authorization
# signed, else waits on to its TimeoutError; escrow_status(verify=True) returns the RPC's read of the escrow as onchain (the marketplace's
# discarded) and status_onchain; wait_for_purchase likewise holds a Masumi onChainState to the escrow of the
# purchase's agreement; wait_until, escrow_status and wait_for_purchase take buyer_wallet_address=;
# 0.4.18: with rpc_url, cancel_payment_authorization(wait=True) raises PaymentAuthorizationUsed only once the buyer's
# RPC shows the transaction the marketplace names emitting the token's AuthorizationUsed of the wallet and nonce
# (ChainReader.authorization_used; else the wait goes on to its TimeoutError): any payment_tx_hash it named had the
# buyer stop revoking an authorization still valid; sign_wallet_proof refuses an expires_at more than a day away or
# not in the future (DeadlineOutOfRange on "wallet_proof.expires_at"): the expiry the marketplace's 400 names was
# signed as it came, years away included; with rpc_url and the buyer's wallet known (buyer_wallet_address=, or the
# wallet this client activated the agreement with), complete(wait=True) returns the agreement only once its status is
# the buyer's escrow's as the RPC reads it (in_challenge: proposed, with the agreement's challenge_deadline; settled:
# settled), else the wait goes on to its TimeoutError: "settled", or a later deadline, while the window was open was
# the marketplace's word;
# 0.4.17: sign_wallet_proof (sdk.wallet_proof), the wallet's EIP-712 WalletProof that POST /agents asks for;
# sdk.typed_data.wallet_proof builds it.
# 0.4.16: a listing (search_services, list_agreements, usage; verify_usage's) yields at most max_items (100,000 by
# default; verify_usage's max_events) and then raises sdk.ListingTooLong (an AnswerRefused): a marketplace naming a
# fresh next page after every full one was followed for ever, every cursor held whole (now as digests);
# activate_escrow and purchase_masumi_job sign the escrow permit for the buyer's permit_nonce=, else the token's
# nonces(buyer) read through rpc_url, and with neither raise NotConfigured before anything is asked (the package's
# nonce, the marketplace's word, was signed: a later nonce's permit becomes usable later);
# sign_activation_package requires permit_nonce; a 402 of another scheme than "exact" is SigningRefused on
# accepts[i].scheme (x402's NoMatchingRequirementsError before); with rpc_url, cancel_payment_authorization(wait=True)
# returns a cancellation only once the buyer's RPC shows its transaction emitting the token's AuthorizationCanceled
# of the wallet and nonce (ChainReader.authorization_cancelled; any hash the marketplace named was taken as revoked);
# InsecureUrl shows an IPv6 host in brackets;
# 0.4.15: MarketplaceClient, ChainReader and NetworkConfig.from_marketplace refuse a base_url or rpc_url in plain http
# (or any scheme but https) to another host than this machine's loopback (sdk.InsecureUrl, a ValueError, before
# anything is sent; allow_insecure_http=True sends anyway): the API key went in clear to any host; a 402 above
# max_amount_atomic, or not in ASCII digits, is SigningRefused on accepts[i].amount (x402's
# NoMatchingRequirementsError before; fullwidth digits were signed); propose_direct_purchase refuses payment
# requirements of another shape or missing a field (SigningRefused on payment_requirements.<field>, not TypeError or
# KeyError) and a payee that is no address (seller.wallet_address, not ValueError or pydantic's ValidationError);
# propose_direct_purchase repeated under its idempotency_key while the first call still runs (another thread) sends
# the purchase signed first under the key (both signed a payment authorization, under two nonces);
# httpx's INFO log record of each request ("HTTP Request: POST <url>") has the RPC URL's secrets taken out (the
# provider's key was logged with every chain read);
# with an RPC, every signing asks its eth_chainId (it was asked once per client, with the token's domain): an RPC URL
# serving another chain later had its nonces and clock signed with (SigningRefused on "rpc chain id");
# a listing's page naming as the next one a page already read is AnswerRefused (it was read again for ever);
# 0.4.14: a public method reading a marketplace answer of another shape than it reads (a field missing, a list for
# an object) raises sdk.UnexpectedAnswer (an AnswerRefused), not KeyError, TypeError, IndexError or AttributeError;
# a body its gzip or deflate coding does not decode raises sdk.UndecodableAnswer (an AnswerRefused, and still an
# httpx.DecodingError), not retried; ChainReader.escrow reads logs or getEscrow data that do not decode, and a
# JSON-RPC answer with neither result nor error, as MalformedAnswer, and verify_usage raises
# sdk.receipts.UsageEscrowUnreadable where the escrow does not read (it was the reader's RpcError); with rpc_url,
# activate_escrow and purchase_masumi_job refuse an escrow permit for another nonce than the token's nonces(buyer)
# (SigningRefused on escrow_permit.message.nonce: a later nonce's permit becomes usable later), and challenge a
# deadline after the escrow's on-chain challenge deadline (getEscrow; DeadlineOutOfRange), or an escrow with nothing
# proposed (SigningRefused on escrow.challengeDeadline); OnchainEscrow.challenge_deadline; request_refund, with
# rpc_url, likewise an unlockTime after the escrow's on-chain challenge deadline, or, while the escrow is active (the
# request kept until a result is proposed), more than its on-chain challengeWindow from now (DeadlineOutOfRange;
# another state or an unreadable escrow: SigningRefused on escrow.challengeDeadline); OnchainEscrow.challenge_window;
# invoke_skill retries the paid POST (a connection failure or timeout, a 503) with the same payment header and
# reads the invocation a repeat answered 402 authorization_already_used names; it takes idempotency_key=, whose repeat
# re-sends the authorization signed the first time (a caller's retry after a lost answer signed a second one, under a
# new nonce, which a compromised marketplace could settle besides the first), and refuses the key for another call
# (ValueError); MarketplaceClient.verify_usage asks the RPC's eth_chainId first and refuses another chain's than the
# pinned network's, or one that does not read (sdk.receipts.UsageChainMismatch): the escrow was read on whatever chain
# the RPC served; challenge and request_refund refuse an agreement whose challenge_window_seconds is no whole number
# (SigningRefused on agreement.challenge_window_seconds: text, null or infinity raised ValueError, TypeError or
# OverflowError out of int(), a float was rounded and signed), and a number in more digits than int() reads (an
# agreement term, a compared amount, a refund's unlockTime) is refused, not raised on (ValueError); activate_escrow,
# propose_direct_purchase, purchase_masumi_job and sign_activation_package warn sdk.SellerUnverified (a UserWarning)
# before signing to a payee the buyer did not name (expected_seller_wallet_address=): a compromised marketplace's own
# wallet was signed to without a word; simplefilter("error", SellerUnverified) makes it a refusal; ChainReader reads
# a block number that is no hex number (the head's, a transaction's, an Activated log's) as MalformedAnswer, not
# ValueError or TypeError out of int(x, 16); cancel_payment_authorization(wait=True) raises
# sdk.PaymentAuthorizationCancelFailed (its `reason`) as soon as the relayed cancellation failed with no use named
# (the buyer cancelled the authorization on-chain itself already): it waited out its whole timeout;
# 0.4.13: propose_direct_purchase repeated under the same idempotency_key re-sends the payment authorization and fee
# permit it signed the first time (a second authorization, under a new nonce, was signed and handed to the
# marketplace, which only the first's cancellation revoked), and refuses the key for another purchase (ValueError);
# sdk.receipts.verify_usage requires price_per_unit (without it no cost was checked) and takes
# pinned_receipt_signers=, which MarketplaceClient.verify_usage passes (NetworkConfig.receipt_signer and the new
# retired_receipt_signers): an escrow's receipt signer as the RPC reads it must be a pinned one (a hostile RPC named
# its own key, and receipts signed with it verified: ReceiptSignerMismatch), and holds the escrow's deposit as read
# to the agreed one, quantity × unit price (a node reporting more let charges past the deposit verify:
# UsageTermsMismatch);
# 0.4.12: cancel_payment_authorization signs the cancellation of the authorization nonce this client signed the
# purchase's payment under (propose_direct_purchase, which takes authorization_nonce=), else of the buyer's
# authorization_nonce= (required then): a compromised marketplace named any nonce, another open purchase's included
# (SigningRefused on cancel_authorization.message.nonce); a date the marketplace states without its UTC offset is
# refused (SigningRefused on agreement.<term>: it was read in this machine's local time), as is a proposal's expires_at
# without one (ValueError, before anything is sent); webhook_signature.verify and proxy_signature.verify refuse a
# timestamp too large for a float (it raised OverflowError: a receiver's 500 for anyone's request); verify_usage holds
# the escrow's settlement proposal to the listing's last receipt once disputed or resolved too (it was checked while
# proposed and once settled only: SettlementProposalMismatch);
# 0.4.11: activate_escrow, propose_agreement and purchase_masumi_job take expected_seller_wallet_address= (the escrow's
# payee, else the marketplace's word; `agreement.seller_wallet_address`), as propose_direct_purchase does; an
# activation package stating another escrow contract, chain, token, deposit, fee or agreement than the buyer's is
# refused, as is a permit nonce of 2**256 or more (not ValueError), and an agreement term that is no whole number
# (a float was rounded and signed), date or address (`agreement.<term>`, not ValueError or TypeError), and so is a
# direct purchase's unit price (`pricing.unit_price_atomic`); a token name() or version() read through the RPC
# that does not decode (not UTF-8, too short), a nonces(buyer) too short, a chain id or block timestamp that is not a
# hex number, refuse signing (SigningRefused; the reader's MalformedAnswer), not UnicodeDecodeError or eth_abi's
# InsufficientDataBytes, and an eip712Domain() answer that does not decode falls back to name() and version();
# 0.4.10: an answer's text (a metered call's `.text`, `iter_text`, `iter_lines`) is decoded in its charset only if that
# is a charset of text, else as UTF-8 (punycode, bz2, rot13, idna: quadratic time or an exception), UTF-16 and UTF-32
# without a byte order mark as big-endian; verify_usage refuses an event whose request id is a lone surrogate
# (UsageMalformed, not UnicodeEncodeError);
# 0.4.9: verify_usage reads the buyer's own escrow (buyer_wallet_address=, or the wallet this client activated the
# agreement with; required otherwise), never another buyer's the marketplace names, and again from the deployment
# block when an activation_tx_hash finds none; a refusal's text is read as UTF-8, not in the codec its charset names;
# an answer is gathered in one buffer (a chunked one in 2-byte chunks held ~60 times its size as a list of pieces);
# 0.4.8: verify_usage holds the agreement to its escrow (its own escrow id, and the terms the on-chain termsHash
# commits to: UsageTermsMismatch) and reads an agreement with no escrow on-chain as holding nothing
# (UsageAboveDeposit); webhook_signature.verify and proxy_signature.verify verify nothing with an empty secret, and
# webhook_signature.verify holds the Marketplace-Event-Type header to the body's signed type (event_type=);
# 0.4.7: bounded_json.loads(duplicate_keys=False) refuses an object with a key given twice (`duplicate_key`);
# purchase_masumi_job bounds a timer left to the marketplace as propose_agreement bounds a default term
# (max_duration_seconds, min_challenge_window_seconds); propose_agreement refuses an answer naming an agreement this
# client proposed on other terms (what activate_escrow holds that agreement to stays the first proposal's);
# 0.4.6: cancel_payment_authorization revokes a direct purchase's x402 authorization once the purchase is off (the
# platform relays the buyer's signed EIP-3009 CancelAuthorization);
# propose_agreement requires max_unit_price_atomic and bounds a term left to the marketplace (expiry within
# max_duration_seconds, 7 days + 1 h; challenge window from min_challenge_window_seconds, an hour, to 30 days),
# activate_escrow holds the agreement to what this client proposed (else to its quantity= and max_unit_price_atomic=),
# a token domain read through the RPC must be the pinned one, and a direct purchase's fee permit usable besides one
# still valid (a lower nonce, another than a failed purchase's) is refused;
# 0.4.5: proxy_signature.verify refuses a marketplace header given twice, webhook_signature.verify holds the
# Marketplace-Event-Id header to the body's signed id (event_id=), purchase_masumi_job requires max_price_atomic, an
# activation or challenge is signed only for the agreement's own escrow id, request_refund takes agreement_id,
# an activation package may name the round of the intent nonce (`intent_nonce_round`), handed out once the
# buyer cancelled the first on-chain;
# 0.4.4: verify_usage refuses a listing whose last event carries no receipt (UsageUnsigned) or a malformed event
# (UsageMalformed), and compares the escrow's last proposal (OnchainEscrow.proposed_amount), not an arbiter's payout,
# with the last receipt;
# 0.4.3: verify_usage ends within its timeout (UsageVerificationTimedOut), the rpc_url's key is out of every chain
# read's error text, the RPC's clock is believed at most rpc_clock_lead ahead when signing;
# 0.4.2: the deadline covers the pool's wait, answers in gzip or deflate only, waits end at their timeout, empty pages
# naming a next one refused, a Masumi job keeps the buyer's timers, verify_usage reads from the pinned deployment on;
# 0.4.1: the deadline covers resolving the host name; 0.4: every request bounded in time and size (deadline,
# max_answer_bytes); 0.3: ChainReader.escrow takes the buyer
VERSION = "0.4.21"
