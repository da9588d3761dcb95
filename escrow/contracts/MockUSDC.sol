// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {Nonces} from "@openzeppelin/contracts/utils/Nonces.sol";

/**
 * @title MockUSDC
 * @notice A stand-in for Circle's USDC (FiatToken v2.2) for dev chains and tests. NEVER deploy it to a
 * public network: the owner can mint at will.
 *
 * What it reproduces from real USDC, so that wallets, x402 clients and the escrow see the same interface:
 * - ERC-20 named as the deployer chooses ("USD Coin" as on Base, "USDC" as on Base Sepolia), symbol "USDC",
 *   6 decimals.
 * - EIP-2612 `permit` under the EIP-712 domain {name: the token's name, version: "2", chainId, verifyingContract}
 *   (OpenZeppelin's ERC20Permit would use version "1", so the domain is built here with version "2"),
 *   with both the (v, r, s) and the `bytes signature` overloads (the latter also accepts ERC-1271 signers).
 * - EIP-3009 `transferWithAuthorization`, `receiveWithAuthorization` (the caller must be the payee) and
 *   `cancelAuthorization`, with USDC's typehashes, random bytes32 nonces, `authorizationState`, the
 *   `validAfter < now < validBefore` window (both bounds exclusive, as in USDC), and both signature overloads.
 * - A blacklist kept by the owner (`blacklist` / `unBlacklist` / `isBlacklisted`, USDC's names): a
 *   blacklisted address can neither send nor receive, nor approve / be approved, nor call `transferFrom`.
 *   Tests use it to model a payee that cannot receive.
 *
 * Revert messages of the EIP-3009 / blacklist paths use USDC's strings ("FiatTokenV2: ...",
 * "Blacklistable: ..."); the ERC-20 and permit paths use OpenZeppelin's custom errors.
 */
contract MockUSDC is ERC20, IERC20Permit, EIP712, Nonces, Ownable {
    /// @dev keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)")
    bytes32 public constant PERMIT_TYPEHASH =
        keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");

    bytes32 public constant TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );

    bytes32 public constant RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );

    bytes32 public constant CANCEL_AUTHORIZATION_TYPEHASH =
        keccak256("CancelAuthorization(address authorizer,bytes32 nonce)");

    mapping(address authorizer => mapping(bytes32 nonce => bool used)) private _authorizationStates;
    mapping(address account => bool blocked) private _blacklisted;

    event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
    event AuthorizationCanceled(address indexed authorizer, bytes32 indexed nonce);
    event Blacklisted(address indexed account);
    event UnBlacklisted(address indexed account);

    error ERC2612ExpiredSignature(uint256 deadline);
    error ERC2612InvalidSigner(address owner);

    /// @param name_ The ERC-20 name, which is also the EIP-712 domain's name, as in USDC.
    constructor(address initialOwner, string memory name_)
        ERC20(name_, "USDC")
        EIP712(name_, "2")
        Ownable(initialOwner)
    {}

    // ---------------------------------------------------------------- ERC-20 metadata

    function decimals() public pure override returns (uint8) {
        return 6;
    }

    /// @notice The EIP-712 version of this token's domain, as USDC's `version()`.
    function version() external pure returns (string memory) {
        return "2";
    }

    // ---------------------------------------------------------------- owner: mint and blacklist

    /// @notice Mint `amount` base units to `to`. Owner only; this is the reason the mock stays on dev chains.
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }

    function blacklist(address account) external onlyOwner {
        _blacklisted[account] = true;
        emit Blacklisted(account);
    }

    function unBlacklist(address account) external onlyOwner {
        _blacklisted[account] = false;
        emit UnBlacklisted(account);
    }

    function isBlacklisted(address account) external view returns (bool) {
        return _blacklisted[account];
    }

    function _requireNotBlacklisted(address account) private view {
        require(!_blacklisted[account], "Blacklistable: account is blacklisted");
    }

    /// @dev Every balance change passes here: neither side of a transfer may be blacklisted (mint/burn ends
    /// are the zero address, which is never blacklisted).
    function _update(address from, address to, uint256 value) internal override {
        _requireNotBlacklisted(from);
        _requireNotBlacklisted(to);
        super._update(from, to, value);
    }

    /// @dev Approvals (including permits) neither from nor to a blacklisted address.
    function _approve(address owner_, address spender, uint256 value, bool emitEvent) internal override {
        _requireNotBlacklisted(owner_);
        _requireNotBlacklisted(spender);
        super._approve(owner_, spender, value, emitEvent);
    }

    /// @dev As USDC: the caller of `transferFrom` must not be blacklisted either.
    function transferFrom(address from, address to, uint256 value) public override returns (bool) {
        _requireNotBlacklisted(msg.sender);
        return super.transferFrom(from, to, value);
    }

    // ---------------------------------------------------------------- EIP-2612

    /// @inheritdoc IERC20Permit
    function permit(address owner_, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
    {
        _permit(owner_, spender, value, deadline, abi.encodePacked(r, s, v));
    }

    /// @notice EIP-2612 permit with a packed 65-byte ECDSA signature or an ERC-1271 signature (USDC v2.2).
    function permit(address owner_, address spender, uint256 value, uint256 deadline, bytes calldata signature)
        external
    {
        _permit(owner_, spender, value, deadline, signature);
    }

    function _permit(address owner_, address spender, uint256 value, uint256 deadline, bytes memory signature)
        private
    {
        if (block.timestamp > deadline) revert ERC2612ExpiredSignature(deadline);
        bytes32 structHash = keccak256(abi.encode(PERMIT_TYPEHASH, owner_, spender, value, _useNonce(owner_), deadline));
        if (!SignatureChecker.isValidSignatureNow(owner_, _hashTypedDataV4(structHash), signature)) {
            revert ERC2612InvalidSigner(owner_);
        }
        _approve(owner_, spender, value);
    }

    /// @inheritdoc IERC20Permit
    function nonces(address owner_) public view override(IERC20Permit, Nonces) returns (uint256) {
        return super.nonces(owner_);
    }

    /// @inheritdoc IERC20Permit
    // solhint-disable-next-line func-name-mixedcase
    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ---------------------------------------------------------------- EIP-3009

    /// @notice Whether `authorizer` has used or cancelled the authorization `nonce`.
    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool) {
        return _authorizationStates[authorizer][nonce];
    }

    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external {
        _transferWithAuthorization(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v)
        );
    }

    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external {
        _transferWithAuthorization(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, signature
        );
    }

    /// @notice As transferWithAuthorization, but only the payee `to` may submit it (no front-running of the
    /// payee's own call).
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external {
        require(to == msg.sender, "FiatTokenV2: caller must be the payee");
        _transferWithAuthorization(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v)
        );
    }

    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external {
        require(to == msg.sender, "FiatTokenV2: caller must be the payee");
        _transferWithAuthorization(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, signature
        );
    }

    function cancelAuthorization(address authorizer, bytes32 nonce, uint8 v, bytes32 r, bytes32 s) external {
        _cancelAuthorization(authorizer, nonce, abi.encodePacked(r, s, v));
    }

    function cancelAuthorization(address authorizer, bytes32 nonce, bytes calldata signature) external {
        _cancelAuthorization(authorizer, nonce, signature);
    }

    function _transferWithAuthorization(
        bytes32 typeHash,
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) private {
        require(block.timestamp > validAfter, "FiatTokenV2: authorization is not yet valid");
        require(block.timestamp < validBefore, "FiatTokenV2: authorization is expired");
        _requireUnusedAuthorization(from, nonce);
        bytes32 structHash = keccak256(abi.encode(typeHash, from, to, value, validAfter, validBefore, nonce));
        require(
            SignatureChecker.isValidSignatureNow(from, _hashTypedDataV4(structHash), signature),
            "FiatTokenV2: invalid signature"
        );
        _authorizationStates[from][nonce] = true;
        emit AuthorizationUsed(from, nonce);
        _transfer(from, to, value);
    }

    function _cancelAuthorization(address authorizer, bytes32 nonce, bytes memory signature) private {
        _requireUnusedAuthorization(authorizer, nonce);
        bytes32 structHash = keccak256(abi.encode(CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce));
        require(
            SignatureChecker.isValidSignatureNow(authorizer, _hashTypedDataV4(structHash), signature),
            "FiatTokenV2: invalid signature"
        );
        _authorizationStates[authorizer][nonce] = true;
        emit AuthorizationCanceled(authorizer, nonce);
    }

    function _requireUnusedAuthorization(address authorizer, bytes32 nonce) private view {
        require(!_authorizationStates[authorizer][nonce], "FiatTokenV2: authorization is used or canceled");
    }
}
